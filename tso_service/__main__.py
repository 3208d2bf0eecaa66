"""``python -m tso_service``: start the TSO frequency service (the same as ``p2pm tso``)."""

from p2pm.cli import app

if __name__ == "__main__":
    app(args=["tso", *__import__("sys").argv[1:]], prog_name="p2pm")
