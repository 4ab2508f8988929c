"""Mesh sampling lives with the sampler, in `rtdlm.sampling.sharded`; this module keeps the
short import path `from rtdlm.sharding import sharded_sample`."""

from rtdlm.sampling.sharded import config_partition_specs, sharded_sample, state_partition_specs

__all__ = ["config_partition_specs", "sharded_sample", "state_partition_specs"]
