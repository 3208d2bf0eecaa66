"""``python -m coordinator``: start the coordinator (the same as ``p2pm coordinator``)."""

from p2pm.cli import app

if __name__ == "__main__":
    app(args=["coordinator", *__import__("sys").argv[1:]], prog_name="p2pm")
