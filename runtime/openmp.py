"""How a worker's OpenMP threads wait: PASSIVE (sleep at once), unless the environment says otherwise.

A worker's expert matmuls run on its own single-threaded pool (faasmoe/model/kernels.py); OpenMP only
serves its small ops. By default OpenMP threads spin for a while after each parallel region, and on a
node shared with a frontend that spin takes the cores the frontend's trunk computes on next (remote
experts at concurrency 4 on the 2-core VM: ITL p50 -1.5 ms, +1.2% tok/s, A B A B). libgomp reads the
variable when torch loads, so it is set in the worker's environment before that.
"""

OMP_WAIT_POLICY = "PASSIVE"
