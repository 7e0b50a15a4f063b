"""`fusedlm tour`: the library's ideas measured end to end on a synthetic world shipped as code.

    from fusedlm.tour import make_world, main
    main(["--smoke", "--out", "tour-smoke"])      # what `fusedlm tour --smoke --out tour-smoke` runs

See run.py for the command, world.py for the world, sections/ for what each part of the report
measures.
"""
from .run import main
from .world import make_world

__all__ = ["main", "make_world"]
