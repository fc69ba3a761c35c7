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
- `ZTSNR_SCALEOUT_PROTOTYPE=1`: apply the PROPOSALS below (each a no-op unless the accelerator is FSDP or DeepSpeed,
  or the world size changed) as monkeypatches over the current code, so the tests can show that they suffice.
  Without it, everything runs exactly as shipped.
- `ZTSNR_SCALEOUT_TRACE=path`: every process appends, per micro-batch the trainer takes, {rank, step, epoch, index}
  to path.<rank> (JSON lines): which samples were consumed, to check a resume across world sizes.

PROPOSALS (issue 18) -- what the shipped code needs for FSDP / DeepSpeed / world-size changes; `apply_prototype`
and tests/scaleout_sampler.py are their working prototypes, the xfail(strict) tests in test_scaleout.py fail today:
- P1 nbs/46 `_prepare`: after `acc.prepare`, rebuild `self.trained` from the prepared modules' `named_parameters()`
  (FSDP2 replaces the parameters by DTensors, FSDP1 renames them `_fsdp_wrapped_module.`): else clip_grad_norm_,
  the optimizer groups and the EMA hold the pre-wrap tensors (test_fsdp2_current_trainer).
- P2 nbs/46 `validate`/`export`: under FSDP or ZeRO-3, gather the full UNet on every process (a collective), build a
  plain UNet from it on the main process and evaluate/export that (`gather_unet`); today the main process runs the
  sharded UNet alone (test_fsdp1_current_trainer).
- P3 nbs/46 `param_checksums`: full tensors (DTensor.full_tensor / FSDP.summon_full_params / GatheredParameters).
- P4 nbs/42 EMA `state_dict`/`load_state_dict`: with DTensor shadows, store the full tensors and redistribute them
  on load (so an EMA written by 2 processes loads on 1); refuse the EMA under FSDP1 and ZeRO-3 (flat/empty shards).
- P5 nbs/46 DeepSpeed: before `prepare`, fill the plugin's 'auto' batch values from the TrainConfig and refuse a
  disagreeing `gradient_accumulation_steps`/`gradient_clipping`/precision (tests/scaleout_deepspeed.py `fill_plugin`;
  the trainer prepares no DataLoader, so accelerate cannot fill them: test_deepspeed_current_trainer); ZeRO-3: build
  the frozen models outside transformers' zero.Init (`load_models_plain`).
- P6 nbs/45 `_weights_only`: allow exactly DeepSpeed's 4 checkpoint classes (`deepspeed_safe_globals`).
- P7 nbs/22 BucketBatchSampler: store (num_replicas, batch_size, data fingerprint) and re-cut the owed items on a new
  layout (tests/scaleout_sampler.py); today a checkpoint of 2 processes refuses to resume on 1.
"""
import json
import os
import sys
from contextlib import contextmanager


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


# ---------------------------------------------------------------------------------------------------------------
# The prototype of PROPOSALS P1-P6 (module doc). FSDP2 gets all of them; FSDP1 gets the `trained` rebuild, the
# gathered evaluation copy and the gathered checksums (its EMA is refused: P4).

def _fsdp(acc) -> int:
    "0 when `acc` is not FSDP, else the FSDP version (1 or 2)."
    from accelerate.utils import DistributedType
    if acc.distributed_type != DistributedType.FSDP: return 0
    return 2 if acc.is_fsdp2 else 1


def _zero3(acc) -> bool:
    "Whether `acc` runs DeepSpeed ZeRO-3 (parameters partitioned across processes)."
    from accelerate.utils import DistributedType
    return acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3


def _clean(name: str) -> str:
    "A parameter name without FSDP1's wrapper segments (what the unwrapped model calls it)."
    return name.replace('_fsdp_wrapped_module.', '').replace('_checkpoint_wrapped_module.', '')


def _full(t):
    "The whole tensor of a DTensor (a collective: every process must call it), else the tensor."
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _plain_copy(base, sd, device):
    "A fresh, unsharded module of `base`'s diffusers class and config holding state dict `sd` (main process only)."
    cls = next(c for c in type(base).__mro__ if c.__module__.startswith('diffusers.'))
    plain = cls.from_config(base.config)
    plain.load_state_dict(sd, strict=True)
    return plain.to(device).eval()


def gather_unet(self, use_ema: bool):
    "On every process (collective): the full UNet weights (EMA if asked); on the main process a plain UNet with them."
    acc, v = self.acc, _fsdp(self.acc)
    base = acc.unwrap_model(self.unet)
    if _zero3(acc):
        if use_ema and self.ema is not None: raise NotImplementedError("EMA under ZeRO-3: the EMA would average empty partitions (P4)")
        sd = acc.get_state_dict(self.unet)           # consolidated on rank 0 (stage3_gather_16bit_weights_on_model_save)
    elif v == 2:
        ema = dict(zip(self.ema.names, self.ema.shadow)) if (use_ema and self.ema is not None) else {}
        sd = {n: _full(ema.get(f'unet.{n}', t)).detach().float().cpu() for n, t in base.state_dict().items()}
    else:
        if use_ema and self.ema is not None:
            raise NotImplementedError("EMA under FSDP1: the EMA holds each process's flat shard; use fsdp_version: 2")
        sd = {_clean(k): t for k, t in acc.get_state_dict(self.unet).items()}   # FULL_STATE_DICT on rank 0
    return _plain_copy(base, sd, acc.device) if acc.is_main_process else None


def deepspeed_safe_globals() -> list:
    "The classes DeepSpeed ZeRO checkpoints pickle (found by loading ZeRO-2 fp32 files with weights_only=True); [] without DeepSpeed."
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError: return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def apply_prototype():
    "Monkeypatch the current Trainer/EMA with the proposed FSDP changes (each a no-op off FSDP)."
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor
    from ztsnr_nb.training import trainer as T
    from ztsnr_nb.training.ema import EMA
    Trainer = T.Trainer

    prepare = Trainer._prepare
    def _prepare(self):
        from accelerate.utils import DistributedType
        if self.acc.distributed_type == DistributedType.DEEPSPEED:   # before prepare: DeepSpeed reads it there
            from scaleout_deepspeed import fill_plugin
            fill_plugin(self.acc.state.deepspeed_plugin, self.cfg, self.acc.num_processes, self.acc.mixed_precision)
        prepare(self)
        if _fsdp(self.acc):   # FSDP2 replaced the parameters by DTensors; FSDP1 renamed them: `trained` must follow
            self.trained = {f'{k}.{_clean(n)}': p for k, mod in self.prepared.items()
                            for n, p in mod.named_parameters() if p.requires_grad}
    Trainer._prepare = _prepare

    eval_weights = Trainer._eval_weights
    @contextmanager
    def _eval_weights(self, use_ema=True):
        g = getattr(self, '_gathered', None)
        if g is None:
            with eval_weights(self, use_ema) as u: yield u
        else: yield g
    Trainer._eval_weights = _eval_weights

    def gathered(method, ema_flag):
        def run(self, *a, **kw):
            if not (_fsdp(self.acc) or _zero3(self.acc)): return method(self, *a, **kw)
            self._gathered = gather_unet(self, ema_flag(self))      # every process takes part; main gets the copy
            try: return method(self, *a, **kw)
            finally: self._gathered = None
        return run
    Trainer.validate = gathered(Trainer.validate, lambda self: self.ema is not None)
    Trainer.export = gathered(Trainer.export, lambda self: self.cfg.checkpoint.export_ema and self.ema is not None)

    checksums = Trainer.param_checksums
    @torch.no_grad()
    def param_checksums(self):
        v = _fsdp(self.acc)
        if _zero3(self.acc):
            import deepspeed
            ts = list(self.trained.values())
            with deepspeed.zero.GatheredParameters(ts, modifier_rank=None): ps = [p.detach().double().clone() for p in ts]
        elif v == 2: ps = [_full(p).detach().double() for p in self.trained.values()]
        elif v == 1:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            with FSDP.summon_full_params(self.unet, writeback=False):
                ps = [p.detach().double().clone() for p in self.unet.parameters() if p.requires_grad]
        else: return checksums(self)
        c = torch.stack([sum(p.sum() for p in ps), sum((p * p).sum() for p in ps)]).view(1, 2).to(self.acc.device)
        return self.acc.gather(c).cpu().tolist()
    Trainer.param_checksums = param_checksums

    # ZeRO-3: transformers (and so our text encoders) would be built partitioned inside zero.Init whenever accelerate's
    # DeepSpeed config is stage 3 (accelerate 1.15 registers it whatever zero3_init_flag says): build the models
    # plain; deepspeed.initialize partitions the trained UNet itself, the frozen parts stay whole.
    load_models = T.load_models
    def load_models_plain(c):
        from accelerate.state import AcceleratorState
        plugin = getattr(AcceleratorState(), 'deepspeed_plugin', None)
        if plugin is None or not plugin.hf_ds_config.is_zero3(): return load_models(c)
        from transformers.integrations import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
        try: return load_models(c)
        finally: plugin.set_deepspeed_weakref()
    T.load_models = load_models_plain
    averages = Trainer._make_averages
    def _make_averages(self):
        if _zero3(self.acc) and self.cfg.ema.enabled:
            raise ValueError("ema.enabled = true with DeepSpeed ZeRO-3: the EMA would average empty partitions; "
                             "use ZeRO-2 or FSDP2, or set ema.enabled = false")
        averages(self)
    Trainer._make_averages = _make_averages

    # DeepSpeed's engine files under weights_only=True (what load_checkpoint forces unless --trust-checkpoint): allow
    # exactly the DeepSpeed classes its ZeRO checkpoints pickle, nothing else
    from ztsnr_nb.training import checkpointing as C
    weights_only = C._weights_only
    @contextmanager
    def _weights_only(force):
        with weights_only(force):
            if not force: yield; return
            with torch.serialization.safe_globals(deepspeed_safe_globals()): yield
    C._weights_only = _weights_only

    # EMA over DTensors: the shadow is sharded like the weights; its checkpoint state is the full tensors
    # (gathered on every process, written by the main one), loaded back as shards of whatever world size resumes.
    ema_sd, ema_load = EMA.state_dict, EMA.load_state_dict
    def state_dict(self):
        if not any(isinstance(s, DTensor) for s in self.shadow): return ema_sd(self)
        sd = ema_sd(self); sd['shadow'] = [_full(s).detach().cpu() for s in self.shadow]; return sd
    def load_state_dict(self, sd):
        if not any(isinstance(s, DTensor) for s in self.shadow): return ema_load(self, sd)
        if list(sd['names']) != self.names: return ema_load(self, sd)      # its error message
        for s, v in zip(self.shadow, sd['shadow']):
            s.copy_(distribute_tensor(v.to(s.device, s.dtype), s.device_mesh, s.placements, src_data_rank=None))
        self.updates, self.last_step = sd['updates'], sd['last_step']
        for k, val in sd['config'].items(): setattr(self, k, val)
    EMA.state_dict, EMA.load_state_dict = state_dict, load_state_dict


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
    if os.environ.get('ZTSNR_SCALEOUT_PROTOTYPE') == '1':
        apply_prototype()
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import scaleout_sampler; scaleout_sampler.install()
    if os.environ.get('ZTSNR_SCALEOUT_TRACE'): trace_batches(os.environ['ZTSNR_SCALEOUT_TRACE'])
    from ztsnr_nb.cli import main
    rc = main(sys.argv[1:])
    if os.environ.get('ZTSNR_SCALEOUT_PROBE'): _probe(os.environ['ZTSNR_SCALEOUT_PROBE'])
    sys.exit(rc)
