"""Sphinx glue for trio_ktls's documentation.

- Generated Markdown: a page line ``<!-- generated: NAME -->`` is replaced, as the page
  is read, by ``tools/docs_pages.py``'s generator of that name (the kernel matrix's
  compatibility tables, the committed benchmark run). The files each one reads are
  recorded as dependencies, so an incremental build notices a new report.
- Offline cross-references. The build runs with ``nitpicky`` (a reference that resolves
  nowhere fails it) but cannot fetch intersphinx inventories (the build machines reach
  package registries only). So references to the standard library and to trio are
  resolved here, to the page each name is documented on; a name neither here nor in our
  own API fails the build, which is the point. References to a private module's name
  (``trio_ktls._stream.KTLSStream``, as autodoc writes type hints) go to the public name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import docs_pages  # noqa: E402

import trio_ktls  # noqa: E402

logger = logging.getLogger(__name__)

PYTHON_DOCS = "https://docs.python.org/3/"
TRIO_DOCS = "https://trio.readthedocs.io/en/stable/"
TYPING_EXTENSIONS_DOCS = "https://typing-extensions.readthedocs.io/en/latest/index.html"

# Builtins live on a few pages of the Python docs rather than one per module.
BUILTIN_PAGES = {
    "library/functions.html": {"bool", "float", "int", "object", "callable", "type"},
    "library/stdtypes.html": {
        "str",
        "bytes",
        "bytearray",
        "memoryview",
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
    },
    "library/constants.html": {"None", "NotImplemented", "Ellipsis"},
}
BUILTIN_EXCEPTIONS = {name for name in dir(__builtins__) if name.endswith(("Error", "Exception"))}

# trio's API reference is split over a few pages; each name we mention, by page.
TRIO_PAGES = {
    "reference-core.html": (
        "trio.run",
        "trio.open_nursery",
        "trio.Nursery",
        "trio.TaskStatus",
        "trio.TASK_STATUS_IGNORED",
        "trio.Cancelled",
        "trio.TooSlowError",
        "trio.fail_after",
        "trio.move_on_after",
        "trio.Event",
        "trio.StrictFIFOLock",
        "trio.BrokenResourceError",
        "trio.ClosedResourceError",
        "trio.BusyResourceError",
        "trio.to_thread.run_sync",
    ),
    "reference-io.html": (
        "trio.abc.AsyncResource",
        "trio.abc.SendStream",
        "trio.abc.ReceiveStream",
        "trio.abc.Stream",
        "trio.abc.HalfCloseableStream",
        "trio.abc.Listener",
        "trio.aclose_forcefully",
        "trio.SocketStream",
        "trio.SocketListener",
        "trio.open_tcp_stream",
        "trio.open_tcp_listeners",
        "trio.serve_tcp",
        "trio.serve_listeners",
        "trio.SSLStream",
        "trio.SSLListener",
        "trio.NeedHandshakeError",
        "trio.open_ssl_over_tcp_stream",
        "trio.open_ssl_over_tcp_listeners",
        "trio.serve_ssl_over_tcp",
        "trio.StapledStream",
    ),
}
TRIO_TARGETS = {name: page for page, names in TRIO_PAGES.items() for name in names}


# Standard-library classes whose ``__module__`` is a private C module document under
# the public one (autodoc writes ``_ssl.SSLSession`` for ``ssl.SSLSession``).
PRIVATE_STDLIB_MODULES = {"_ssl": "ssl", "_socket": "socket", "_io": "io"}


def external_url(target: str) -> str | None:
    """Where the standard library's or trio's documentation describes ``target``."""
    private, dot, rest = target.partition(".")
    if dot and private in PRIVATE_STDLIB_MODULES:
        target = f"{PRIVATE_STDLIB_MODULES[private]}.{rest}"
    if target in TRIO_TARGETS:
        return f"{TRIO_DOCS}{TRIO_TARGETS[target]}#{target}"
    # trio's classes' methods (trio.abc.Stream.send_all) are anchored under the class.
    owner = target.rpartition(".")[0]
    if owner in TRIO_TARGETS:
        return f"{TRIO_DOCS}{TRIO_TARGETS[owner]}#{target}"
    for page, names in BUILTIN_PAGES.items():
        if target in names:
            return f"{PYTHON_DOCS}{page}#{target}"
    if target in BUILTIN_EXCEPTIONS:
        return f"{PYTHON_DOCS}library/exceptions.html#{target}"
    if target in sys.stdlib_module_names:
        return f"{PYTHON_DOCS}library/{target}.html#module-{target}"
    if target == "trio":
        return TRIO_DOCS
    if target.startswith("typing_extensions."):
        return f"{TYPING_EXTENSIONS_DOCS}#{target}"
    # A standard-library module's names are anchored by their full name on its page
    # (collections.abc.Mapping is on library/collections.abc.html).
    parts = target.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:end])
        top = module.split(".")[0]
        if top in sys.stdlib_module_names and not top.startswith("_") and module in sys.modules:
            return f"{PYTHON_DOCS}library/{module}.html#{target}"
    return None


def public_name(target: str) -> str | None:
    """``trio_ktls.X`` for a private module's ``trio_ktls._module.X[.member]``."""
    parts = target.split(".")
    if (
        len(parts) >= 3
        and parts[0] == "trio_ktls"
        and parts[1].startswith("_")
        and parts[2] in trio_ktls.__all__
    ):
        return ".".join(["trio_ktls", *parts[2:]])
    return None


def resolve_missing(
    app: Sphinx, env: BuildEnvironment, node: Any, contnode: nodes.Element
) -> nodes.Element | None:
    if node.get("refdomain") != "py":
        return None
    target: str = node["reftarget"]
    public = public_name(target)
    if public is not None:
        domain = env.get_domain("py")
        return domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], public, node, contnode
        )
    url = external_url(target)
    if url is None:
        return None
    reference = nodes.reference("", "", internal=False, refuri=url, reftitle=target)
    reference.append(contnode)
    return reference


def expand_generated(app: Sphinx, docname: str, source: list[str]) -> None:
    text = source[0]
    if docs_pages.MARKER.search(text) is None:
        return
    source[0] = docs_pages.expand(text, ROOT)
    # Rebuild the page when what it was generated from changes.
    for path in (
        ROOT / "tools" / "kernel_lab.py",
        ROOT / docs_pages.BENCH_REPORT,
        *(docs_pages.junit_path(ROOT, label) for label in docs_pages.kernel_lab.LABELS),
    ):
        app.env.note_dependency(str(path))


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("source-read", expand_generated)
    app.connect("missing-reference", resolve_missing)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
