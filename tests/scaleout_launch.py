"""Run `ztsnr_nb.cli` under `accelerate launch` with FSDP allowed on CPU processes (gloo), for tests/test_scaleout.py.

accelerate 1.15 turns an FSDP config into `DistributedType.FSDP` only for GPU-like process types (MULTI_GPU, MULTI_XPU,
...). On a CPU-only machine the processes are MULTI_CPU, and `ACCELERATE_USE_FSDP=true` is dropped without a word:
the run silently trains as DDP. Torch's FSDP itself runs on CPU with gloo, so this launcher re-enables the one branch
accelerate skips -- MULTI_CPU + an FSDP config -> FSDP, on device 'cpu' -- and then runs the unchanged CLI.
On GPUs no shim is needed (and none is applied: the patch only acts on MULTI_CPU processes).

    accelerate launch --config_file tests/accelerate_configs/fsdp2_cpu.yaml tests/scaleout_launch.py CONFIG.toml [...]

Environment:
- `ZTSNR_SCALEOUT_NO_SHIM=1`: leave accelerate as it is (to show what it does on CPU without the shim).
- argument `--probe-only`: construct the trainer's Accelerator, write the probe (below), exit.
- `ZTSNR_SCALEOUT_PROBE=path` : every process writes (distributed type, FSDP version, world size, rank) to path.<rank>
  after the run, so a test can check that FSDP really was in use and not silently DDP.
- `ZTSNR_SCALEOUT_TRACE=path`: every process appends, per micro-batch the trainer takes, {rank, step, epoch, index}
  to path.<rank> (JSON lines): which samples were consumed, to check a resume across world sizes.

Everything else is the shipped trainer: the shim only makes accelerate hand it an FSDP or DeepSpeed accelerator on CPU.
"""
import json
import os
import sys


def allow_fsdp_on_cpu():
    "Patch AcceleratorState: an FSDP plugin on MULTI_CPU processes gives DistributedType.FSDP on device 'cpu'."
    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (fsdp_plugin is not None and os.environ.get('ACCELERATE_USE_FSDP', 'false').lower() == 'true'
                and self.distributed_type == DistributedType.MULTI_CPU):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state['distributed_type'] = DistributedType.FSDP
            # MULTI_CPU processes get device 'cpu:0'; FSDP1 compares it with the parameters' 'cpu' and refuses
            self.device = PartialState._shared_state['device'] = torch.device('cpu')
    AcceleratorState.__init__ = patched


def allow_deepspeed_on_cpu():
    """Patch accelerate so that a DeepSpeed config runs on CPU processes (gloo), as DeepSpeed's CPU accelerator can:
    (1) the trainer's Accelerator(cpu=True) skips DeepSpeed, so it is built with cpu=False; (2) with cpu=False and no
    GPU, PartialState finds no backend and sets num_processes = 1, process_index = 0 on EVERY process (each thinks it
    is alone and the main one), so the backend becomes gloo and the process group is read as usual."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    if os.environ.get('ACCELERATE_USE_DEEPSPEED', 'false').lower() != 'true' or torch.cuda.is_available(): return
    init, backend = Accelerator.__init__, PartialState._prepare_backend

    def patched(self, *args, cpu=False, **kwargs): init(self, *args, cpu=False, **kwargs)
    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend_=None, **kw):
        b, t = backend(self, cpu, sagemaker_dp, backend_, **kw)
        if b is None and int(os.environ.get('LOCAL_RANK', -1)) != -1: return 'gloo', DistributedType.MULTI_CPU
        return b, t
    Accelerator.__init__, PartialState._prepare_backend = patched, prepare_backend
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (deepspeed_shm_comm, minutes of g++ on 2 busy
    # cores) whenever a compiler is there; it is only a faster path, gloo does the same collectives: skip the build
    import deepspeed.comm.torch as ds_torch
    ds_torch.build_shm_op = lambda: None


def trace_batches(path):
    "Record every micro-batch the trainer consumes (its item indices) to path.<rank>."
    from ztsnr_nb.training.trainer import Trainer
    batches = Trainer.batches
    def traced(self):
        for b in batches(self):
            with open(f'{path}.{self.acc.process_index}', 'a') as f:
                f.write(json.dumps({'rank': self.acc.process_index, 'world': self.acc.num_processes, 'step': self.state.step,
                                    'epoch': self.state.epoch, 'index': [int(i) for i in b.get('index', [])]}) + '\n')
            yield b
    Trainer.batches = traced


def _probe(path):
    from accelerate.state import AcceleratorState
    s = AcceleratorState()
    plugin = getattr(s, 'fsdp_plugin', None)
    rec = {'distributed_type': str(s.distributed_type), 'num_processes': s.num_processes, 'rank': s.process_index,
           'fsdp_version': getattr(plugin, 'fsdp_version', None)}
    with open(f'{path}.{s.process_index}', 'w') as f: json.dump(rec, f)


if __name__ == '__main__':
    if os.environ.get('ZTSNR_SCALEOUT_NO_SHIM') != '1': allow_fsdp_on_cpu(); allow_deepspeed_on_cpu()
    if sys.argv[1:] == ['--probe-only']:            # the trainer's Accelerator(...) and nothing else
        import torch
        from accelerate import Accelerator
        Accelerator(cpu=not torch.cuda.is_available())
        _probe(os.environ['ZTSNR_SCALEOUT_PROBE']); sys.exit(0)
    if os.environ.get('ZTSNR_SCALEOUT_TRACE'): trace_batches(os.environ['ZTSNR_SCALEOUT_TRACE'])
    from ztsnr_nb.cli import main
    rc = main(sys.argv[1:])
    if os.environ.get('ZTSNR_SCALEOUT_PROBE'): _probe(os.environ['ZTSNR_SCALEOUT_PROBE'])
    sys.exit(rc)
