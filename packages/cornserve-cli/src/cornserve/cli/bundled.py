"""The example app and request shipped inside the package, so `cornserve demo` needs no source checkout.

`cornserve/cli/examples/` holds symbolic links to the repository's top-level `examples/` files: a
clone keeps one copy of each example (edited where it always was), and building the wheel follows
the links, so an installed wheel or a container image carries the files themselves. They are read
with `importlib.resources`, which works for both.
"""

from __future__ import annotations

from importlib.resources import files

DEMO_APP_FILE = "mllm_app.py"
"""The example multimodal app that `cornserve demo` and a container deployment register as 'demo'."""
DEMO_REQUEST_FILE = "mllm_request.json"


class MissingExampleError(RuntimeError):
    """A bundled example is missing from the installed package (a broken install or checkout)."""


def example_text(name: str) -> str:
    """The text of bundled example `name` (a file name in `cornserve/cli/examples/`)."""
    resource = files("cornserve.cli").joinpath("examples", name)
    try:
        return resource.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise MissingExampleError(
            f"the bundled example {name!r} is missing from the cornserve-cli package ({resource}); "
            "reinstall cornserve-cli"
        ) from exc
