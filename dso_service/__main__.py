"""``python -m dso_service``: start the DSO validation service (the same as ``p2pm dso``)."""

from p2pm.cli import app

if __name__ == "__main__":
    app(args=["dso", *__import__("sys").argv[1:]], prog_name="p2pm")
