"""`erasure train` on accelerate's FSDP path, on CPU processes (a launcher for tests only).

accelerate never picks FSDP for CPU processes (`AcceleratorState` turns FSDP on only for accelerator
devices; on CPUs it stays MULTI_CPU, i.e. DDP), while torch's FSDP2 itself shards over gloo on CPUs.
This launcher sets the state's distributed type to FSDP, with the plugin accelerate builds from the
environment (FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, …), right after the Accelerator is built.
Everything after that — `prepare` and `fully_shard`, the collectives, `get_state_dict` — is
accelerate's and torch's own code, run for real by the two processes.

    ACCELERATE_USE_CPU=true FSDP_VERSION=2 torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py --recipe …
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    built = Accelerator.__init__

    def build_on_fsdp(self, *args, **kwargs):
        built(self, *args, **kwargs)
        # both shared states: every later AcceleratorState() copies the PartialState's type over
        PartialState().distributed_type = self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()

    Accelerator.__init__ = build_on_fsdp
    from erasure.cli import main

    main(["train", *sys.argv[1:]])
