"Shared by tests/test_faults.py and the terminal summary in tests/conftest.py: one row per kind of injected fault."
from __future__ import annotations

RESULTS: dict[str, list[int]] = {}   # kind -> [tried, survived, data lost]


def record(kind: str, survived: bool, lost: int = 0) -> None:
    "Count one injected fault of `kind`: whether the code survived it as specified, and how many units of data were lost."
    row = RESULTS.setdefault(kind, [0, 0, 0])
    row[0] += 1; row[1] += int(bool(survived)); row[2] += int(lost)


def table() -> str:
    "The summary table (kinds tried / survived / data lost), plain text."
    w = max([len(k) for k in RESULTS] + [20])
    lines = [f"{'fault kind':{w}s}  tried  survived  data lost", '-' * (w + 28)]
    lines += [f'{k:{w}s}  {t:5d}  {s:8d}  {l:9d}' for k, (t, s, l) in RESULTS.items()]
    tot = [sum(r[i] for r in RESULTS.values()) for i in range(3)]
    lines += ['-' * (w + 28), f"{'total (' + str(len(RESULTS)) + ' kinds)':{w}s}  {tot[0]:5d}  {tot[1]:8d}  {tot[2]:9d}"]
    return '\n'.join(lines)
