"""Pipeline parallelism over `net.blocks` (docs/pipeline.md): `split` cuts the net into stages, `runtime` runs
torch.distributed.pipelining's schedules over them, `state` averages gradients, clips by the global norm and
gathers checkpoints. deepres.pipeline.strategy puts it under Lightning."""
