"""The API reference, generated from the docstrings with pdoc (``make docs``): every warning is
an error (a broken cross-reference, a module that fails to import, an unparsable docstring).

One warning is tolerated, by a filter that names it exactly: pdoc cannot evaluate the postponed
annotations of a ``typing.NamedTuple``'s generated ``__init__`` (``RankingResult``,
``SearchResult``, ``ModelOutput``): namedtuple builds that function in a namespace of its own, so
``np`` or ``Optional`` are not defined there even though the module imports them.  The fields'
types still appear in the class's own documentation.

    python scripts/build_docs.py [--out build/docs]
"""
import argparse
import sys
import warnings

NAMEDTUPLE_INIT = (r"Error parsing type annotation ForwardRef\('[^']*'\) for "
                   r"reid_kernels\.[\w.]+\.(RankingResult|SearchResult|ModelOutput)\.__init__\.")
MODULES = ["reid_kernels", "reid_kernels.training"]


def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--out", default="build/docs", help="output folder (default: build/docs)")
    out = args.parse_args(argv).out
    warnings.simplefilter("error")
    import pdoc  # after the filter: a warning while importing the modules is an error too
    import pdoc.render

    warnings.filterwarnings("ignore", message=NAMEDTUPLE_INIT)
    pdoc.render.configure(docformat="restructuredtext")
    pdoc.pdoc(*MODULES, output_directory=__import__("pathlib").Path(out))
    print(f"API reference written to {out}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
