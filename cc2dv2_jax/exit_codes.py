"""Exit statuses of every command here (main, predict, launch tools, bench): the one table.

README "Reliability" documents them for users and schedulers.
"""
OK = 0
SOME_FAILED = 1  # some inputs (predict), runs (launch/ablate.py) or sections (bench) failed
BAD_INPUT = 2  # config, command line, dataset or workdir: nothing trained, nothing half-written
NONFINITE = 3  # training stopped on a non-finite loss or gradient (see nonfinite_report.json)
PREEMPTED = 75  # SIGTERM, checkpoint saved: rerun the same command (EX_TEMPFAIL, requeue on it)
