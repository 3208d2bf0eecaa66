"""``python -m peer_node``: start one peer process (the same as ``p2pm peer``)."""

from p2pm.cli import app

if __name__ == "__main__":
    app(args=["peer", *__import__("sys").argv[1:]], prog_name="p2pm")
