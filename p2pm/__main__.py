"""``python -m p2pm``: the same as the ``p2pm`` command."""

from common.process import use_single_threaded_blas

use_single_threaded_blas()  # before numpy is imported: every role is one process among many

from p2pm.cli import app  # noqa: E402

if __name__ == "__main__":
    app(prog_name="p2pm")
