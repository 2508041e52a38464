# SPDX-License-Identifier: MIT
"""Programs apart from the library: ``pysbn`` / ``python -m pysbn {demo,bench,info}``.

- :mod:`pysbn.tools.cli`: the command line (``main(argv)``, ``info``);
- :mod:`pysbn.tools.demo`: the main job (synchronised training over several processes, checked);
- :mod:`pysbn.tools.bench`: the benchmark protocol (``bench``), :mod:`pysbn.tools.bench_sync`
  its 2-process sync part (``bench --sync``), :mod:`pysbn.tools.chart` its chart (matplotlib,
  in the ``bench`` extra).

The tools use the library through its public API only (``import pysbn`` and the names of
``pysbn.__all__``), as any user program would.
"""
