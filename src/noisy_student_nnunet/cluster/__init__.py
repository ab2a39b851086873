"""The chain as SLURM jobs: :mod:`.chain` (what to run, and what is done), :mod:`.slurm` (the job graph and its
submission), :mod:`.task` (what one job runs)."""
