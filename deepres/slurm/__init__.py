"""Running deepres on SLURM.

- ``deepres.slurm.submit``: ``deepres submit`` renders ``slurm/deepres.sbatch`` from a training config and
  cluster options, checks one against the other, and calls ``sbatch``.
- ``deepres.slurm.requeue``: signal handling, requeue, and which checkpoint a restarted job resumes from
  (standard library only, imported before torch).
- ``deepres.slurm.callback``: the Lightning callback and cluster environment that go with it.
- ``scripts/slurm_local.sh``: a SLURM cluster on one machine, for the tests and for trying this out.
"""
