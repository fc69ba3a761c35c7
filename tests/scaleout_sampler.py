"""Prototype (for nbs/22) of a BucketBatchSampler state that survives a change of world size or per-process batch size.

Today `BucketBatchSampler.state_dict()` is {'epoch', 'position', 'seed', 'fingerprint'}: `position` counts *global*
batches of the epoch plan, and that plan depends on num_replicas R and batch_size B (a global batch is R·B_b items of
one bucket, and the batches are shuffled as a whole). The fingerprint hashes R and B in, so a checkpoint written by 2
processes refuses to load on 1 (ValueError "state fingerprint ... != ..."), and even without that check position p
would point into a different plan.

The remap proposed here keeps the current behaviour bit for bit when the layout (R, B) is unchanged, and otherwise:
1. rebuilds the plan the checkpoint was written with (the epoch plan at the old R, B; or the stored plan of an epoch
   that was itself remapped),
2. takes the multiset of items still owed this epoch, M - consumed (M = the epoch's items with their repeats;
   consumed = everything in plan[:p], padding copies included): no item is repeated, none skipped,
3. walks plan[p:] in order and re-cuts each bucket's owed items into global batches of R'·B'_b (padding the last one
   of a bucket to a multiple of R', as epoch_plan does, or dropping it with drop_last), so every process gets the
   same number of batches (an uneven count would hang DDP at the next all-reduce),
4. stores the new plan as plan[:p] + re-cut batches, with the position unchanged, so the trainer's counter
   (TrainState.consumed, passed back as `consumed=`) stays valid and a second change (2 -> 1 -> 2) works the same way.
The epoch after it is the normal epoch plan at the new layout.

State keys added: 'num_replicas', 'batch_size', 'data_fingerprint' (the fingerprint without R and B) and, for a
remapped epoch only, 'plan' / 'plan_sizes' (numpy int64 arrays: split_state in 45_training_checkpointing stores
them as safetensors tensors).

Use: `RemappableBucketBatchSampler` (a subclass, for tests) or `install()` (patches the class in a launched process).
"""
from __future__ import annotations

import copy
import hashlib
from collections import Counter

import numpy as np

from ztsnr_nb.data.buckets import BucketBatchSampler

_ORIG = {k: getattr(BucketBatchSampler, k) for k in ('state_dict', 'load_state_dict', '__iter__', 'set_epoch')}


def data_fingerprint(self) -> str:
    "The sampler's fingerprint without the layout (num_replicas, batch_size): what the data and its buckets are."
    h = hashlib.sha1(np.ascontiguousarray(self._buckets, dtype=np.int64).tobytes())
    h.update(repr((self.drop_last, self.shuffle, self.dynamic_pixels, self.bucket_sizes)).encode())
    return h.hexdigest()[:16]


def plan_for(self, epoch: int, num_replicas: int, batch_size: int) -> list[np.ndarray]:
    "The epoch plan this sampler would have at another layout (same items, seed, buckets)."
    s = copy.copy(self)
    s.num_replicas, s.batch_size = int(num_replicas), int(batch_size)
    s._per_bucket = [(k, n, s.bucket_batch_size(k)) for k, n, _ in self._per_bucket]
    return s.epoch_plan(epoch)


def _current_plan(self) -> list[np.ndarray]:
    ov = getattr(self, '_override', None)
    return ov[1] if ov is not None and ov[0] == self.epoch else self.epoch_plan()


def recut(self, done: list[np.ndarray], rest: list[np.ndarray]) -> list[np.ndarray]:
    "Global batches at this sampler's layout of the items owed after `done` (multiset M - done), in `rest`'s order."
    bucket_of = dict(zip(self._items.tolist(), self._buckets.tolist()))
    owed = Counter(self._items.tolist()) - Counter(int(i) for b in done for i in b)
    R, queues, out = self.num_replicas, {}, []
    size = {k: bs * R for k, _, bs in self._per_bucket}
    for b in rest:
        for i in map(int, b):
            if owed[i] <= 0: continue                      # a padding copy, or already consumed: not owed
            owed[i] -= 1
            k = bucket_of[i]
            q = queues.setdefault(k, [])
            q.append(i)
            if len(q) == size[k]: out.append(np.asarray(q, dtype=np.int64)); queues[k] = []
    for k, q in queues.items():                            # each bucket's last, short batch
        if not q or self.drop_last: continue
        m = -(-len(q) // R) * R
        pool = np.asarray(q + [i for i in self._items.tolist() if bucket_of[i] == k], dtype=np.int64)
        out.append(np.resize(pool, m) if m > len(q) else np.asarray(q, dtype=np.int64))
    return out


def state_dict(self, consumed: int | None = None) -> dict:
    "The current state plus the layout and, in a remapped epoch, the plan."
    sd = _ORIG['state_dict'](self, consumed)
    sd.update(num_replicas=self.num_replicas, batch_size=self.batch_size, data_fingerprint=data_fingerprint(self))
    ov = getattr(self, '_override', None)
    if ov is not None and ov[0] == self.epoch:
        sd['plan'] = np.concatenate(ov[1]).astype(np.int64) if ov[1] else np.zeros(0, np.int64)
        sd['plan_sizes'] = np.asarray([len(b) for b in ov[1]], dtype=np.int64)
    return sd


def load_state_dict(self, state: dict) -> None:
    "Same layout: as today (exact). Another layout: the owed items of the epoch, re-cut for this layout (module doc)."
    R0, B0 = state.get('num_replicas', self.num_replicas), state.get('batch_size', self.batch_size)
    plan = None
    if state.get('plan') is not None:
        flat, sizes = np.asarray(state['plan'], np.int64), np.asarray(state['plan_sizes'], np.int64)
        plan = np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else []
    self._override = None
    if (R0, B0) == (self.num_replicas, self.batch_size):
        base = {k: state[k] for k in ('epoch', 'position', 'seed', 'fingerprint') if k in state}
        if plan is None: return _ORIG['load_state_dict'](self, base)      # today's exact path
        _ORIG['load_state_dict'](self, {**base, 'position': 0})          # checks fingerprint and seed
        self._override, self._resume = (self.epoch, plan), int(state['position'])
        self._pos = self._resume
        return
    if state.get('data_fingerprint') != data_fingerprint(self):
        raise ValueError(f"state data fingerprint {state.get('data_fingerprint')!r} != this sampler's {data_fingerprint(self)!r}: "
                         'the bucket assignment or repeats changed since the checkpoint; rebuild the sampler with the same data')
    if state.get('seed') != self.seed:
        raise ValueError(f"state seed={state.get('seed')!r} != seed={self.seed}: construct the sampler with the checkpoint's seed")
    epoch, pos = int(state['epoch']), int(state['position'])
    old = plan if plan is not None else plan_for(self, epoch, R0, B0)
    if not 0 <= pos <= len(old): raise ValueError(f'state position={pos} is outside 0..{len(old)} batches of that epoch')
    new = list(old[:pos]) + recut(self, old[:pos], old[pos:])
    self.epoch, self._override, self._resume, self._pos = epoch, (epoch, new), pos, pos


def __iter__(self):
    start, self._resume = self._resume, 0
    plan, R, r = _current_plan(self), self.num_replicas, self.rank
    self._pos = start
    for gb in plan[start:]:
        m = gb.size // R
        self._pos += 1
        yield gb[r * m:(r + 1) * m].tolist()


def set_epoch(self, epoch: int) -> None:
    _ORIG['set_epoch'](self, epoch)
    ov = getattr(self, '_override', None)
    if ov is not None and ov[0] != self.epoch: self._override = None


class RemappableBucketBatchSampler(BucketBatchSampler):
    "BucketBatchSampler with the proposed world-size-independent resume (this module's doc)."
    state_dict, load_state_dict, __iter__, set_epoch = state_dict, load_state_dict, __iter__, set_epoch


def install():
    "Patch ztsnr_nb.data.buckets.BucketBatchSampler in this process with the prototype."
    for k, f in (('state_dict', state_dict), ('load_state_dict', load_state_dict), ('__iter__', __iter__), ('set_epoch', set_epoch)):
        setattr(BucketBatchSampler, k, f)
