"""``python -m p2pm``: the same as the ``p2pm`` command."""

from p2pm.cli import app

if __name__ == "__main__":
    app(prog_name="p2pm")
