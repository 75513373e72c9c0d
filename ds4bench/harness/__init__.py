"""The measuring harness: the matrix's parameters, specs, cells, rounds and trees, the processes
and jobs that run them, records and run directories, the stage probe, KL, verdicts and round
statistics, Nsight Systems, the kernel bench and other engines run as commands. It uses the
engine; it imports nothing of the views or the CLI."""
