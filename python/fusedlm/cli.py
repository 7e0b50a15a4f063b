"""The `fusedlm` command line: `fusedlm bench [...]` runs the benchmark suites, `fusedlm tour [...]`
the end-to-end tour of the library on a synthetic world."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fusedlm bench [--full] [--suite NAME] [--out DIR] [--threads N]\n"
              "       fusedlm tour [--quick|--full|--smoke] [--out DIR] [--seed N] [--threads N]\n\n"
              "  bench   run the benchmark suites: fusedlm's ops against their peers, as a ratio table\n"
              "  tour    train and measure every idea of the library on a synthetic world; writes a report with plots")
        return 0
    if argv[0] == "bench":
        from .benchmarks.run import main as bench_main

        return bench_main(argv[1:])
    if argv[0] == "tour":
        from .tour import main as tour_main

        return tour_main(argv[1:])
    print(f"fusedlm: unknown command {argv[0]!r}; try 'fusedlm --help'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
