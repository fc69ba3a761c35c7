"""PROTOTYPE for nbs/46 (PROPOSAL P5 in tests/scaleout_launch.py): the DeepSpeed config a TrainConfig implies, and the check of a
user's DeepSpeed config against it. Used by tests/test_scaleout.py and, under ZTSNR_SCALEOUT_PROTOTYPE=1, by
tests/scaleout_launch.py, which fills accelerate's DeepSpeed plugin with it before `prepare`."""
from __future__ import annotations


def deepspeed_config(cfg, num_processes: int, zero_stage: int = 2, offload_optimizer: str = 'none',
                     offload_param: str = 'none', mixed_precision: str | None = None) -> dict:
    """The DeepSpeed config a TrainConfig implies (`mixed_precision`: the one the run uses, default optim's). The trainer
    would set it on AcceleratorState().deepspeed_plugin before `prepare`: it prepares no DataLoader, so accelerate
    cannot fill train_micro_batch_size_per_gpu itself and stops with a ValueError."""
    o, d = cfg.optim, cfg.data
    mp = mixed_precision or o.mixed_precision
    if zero_stage not in (0, 1, 2, 3): raise ValueError(f'zero_stage={zero_stage!r}: use 0, 1, 2 or 3')
    for name, dev in (('offload_optimizer', offload_optimizer), ('offload_param', offload_param)):
        if dev not in ('none', 'cpu', 'nvme'): raise ValueError(f"{name}={dev!r}: use 'none', 'cpu' or 'nvme'")
    if offload_param != 'none' and zero_stage != 3: raise ValueError('offload_param needs zero_stage = 3')
    zero = {'stage': zero_stage, 'overlap_comm': True, 'contiguous_gradients': True, 'reduce_scatter': True,
            'offload_optimizer': {'device': offload_optimizer, 'pin_memory': offload_optimizer == 'cpu'}}
    if zero_stage == 3:
        zero.update(offload_param={'device': offload_param, 'pin_memory': offload_param == 'cpu'},
                    stage3_gather_16bit_weights_on_model_save=True)   # export and validation need whole weights
    return {'train_micro_batch_size_per_gpu': d.batch_size, 'gradient_accumulation_steps': o.grad_accum,
            'train_batch_size': d.batch_size * o.grad_accum * num_processes,
            'gradient_clipping': float(o.max_grad_norm),      # 0 = off, in DeepSpeed as in optim.max_grad_norm
            'bf16': {'enabled': mp == 'bf16'},
            'fp16': {'enabled': mp == 'fp16', 'loss_scale': 0, 'initial_scale_power': 16},
            'zero_optimization': zero,
            'zero_allow_untested_optimizer': True,      # our torch optimizer (ZeRO-Offload wants DeepSpeedCPUAdam instead)
            'steps_per_print': 2 ** 31 - 1, 'wall_clock_breakdown': False}


def deepspeed_problems(ds: dict, cfg, num_processes: int, mixed_precision: str | None = None) -> list[str]:
    "What in a user's DeepSpeed config disagrees with the TrainConfig (empty: consistent); 'auto' values agree."
    o, d, out = cfg.optim, cfg.data, []
    mp = mixed_precision or o.mixed_precision
    def bad(key, have, want, fix): out.append(f'deepspeed {key} = {have!r} but {fix} = {want!r}: make them equal')
    gas = ds.get('gradient_accumulation_steps', 1)
    if gas not in ('auto', o.grad_accum): bad('gradient_accumulation_steps', gas, o.grad_accum, 'optim.grad_accum')
    clip = ds.get('gradient_clipping', 'auto')
    if clip != 'auto' and float(clip) != float(o.max_grad_norm): bad('gradient_clipping', clip, o.max_grad_norm, 'optim.max_grad_norm')
    mb = ds.get('train_micro_batch_size_per_gpu', 'auto')
    if mb not in ('auto', d.batch_size): bad('train_micro_batch_size_per_gpu', mb, d.batch_size, 'data.batch_size')
    tb = ds.get('train_batch_size', 'auto')
    if tb != 'auto' and tb != d.batch_size * o.grad_accum * num_processes:
        bad('train_batch_size', tb, d.batch_size * o.grad_accum * num_processes, 'data.batch_size x optim.grad_accum x processes')
    for k in ('bf16', 'fp16'):
        have = (ds.get(k) or {}).get('enabled', False)
        if have not in ('auto', mp == k): bad(f'{k}.enabled', have, mp == k, f"(mixed precision == '{k}')")
    if (ds.get('zero_optimization') or {}).get('offload_optimizer', {}).get('device', 'none') not in ('none', None) \
            and o.optimizer != 'adamw':
        out.append(f"deepspeed offload_optimizer runs DeepSpeedCPUAdam: optim.optimizer = {o.optimizer!r} cannot be offloaded; use 'adamw'")
    if cfg.data.auto_micro_batch:
        out.append('data.auto_micro_batch = true splits batches into a varying number of backward passes; DeepSpeed counts '
                   'gradient_accumulation_steps backward passes per step: set data.auto_micro_batch = false')
    return out


def fill_plugin(plugin, cfg, num_processes: int, mixed_precision: str | None = None) -> dict:
    """Make accelerate's DeepSpeed plugin config agree with `cfg` before `prepare`: refuse what disagrees (ValueError naming
    both keys), fill the 'auto' values accelerate cannot fill (it prepares no DataLoader of ours). Returns the config."""
    ds = plugin.deepspeed_config
    problems = deepspeed_problems(ds, cfg, num_processes, mixed_precision)
    fatal = [p for p in problems if 'auto_micro_batch' not in p]   # the trainer turns that one off itself (P5)
    if fatal: raise ValueError('; '.join(fatal))
    want = deepspeed_config(cfg, num_processes, zero_stage=int(ds.get('zero_optimization', {}).get('stage', 2)),
                            mixed_precision=mixed_precision)
    for k in ('train_micro_batch_size_per_gpu', 'train_batch_size', 'gradient_accumulation_steps', 'gradient_clipping'):
        if ds.get(k, 'auto') == 'auto': ds[k] = want[k]
    for k in ('bf16', 'fp16'):
        if (ds.get(k) or {}).get('enabled', 'auto') == 'auto': ds.setdefault(k, {})['enabled'] = want[k]['enabled']
    ds['zero_allow_untested_optimizer'] = True
    return ds
