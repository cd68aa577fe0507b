"""Progress bars of long runs, with tqdm (``tqdm.auto``: a widget in notebooks, a text bar elsewhere).

Fields: what is counted (directions, estimates), how many of the total, the rate, and running figures
(evaluations per direction, the running log volume) after the bar.
"""

from __future__ import annotations


from tqdm.auto import tqdm

_BAR_FORMAT = "{desc} [{bar:24}] {n_fmt}/{total_fmt}  {rate_fmt}  {elapsed}{postfix}"


class ProgressBar:
    """``label [####....] done/total  rate  elapsed  key=value ...`` on stderr; silent when not ``enabled``."""

    def __init__(self, total: int, label: str = "directions", enabled: bool = True):
        self._bar = tqdm(total=total, desc=label, disable=not enabled, bar_format=_BAR_FORMAT, ascii=True, leave=True)

    def update(self, n: int = 1, **fields) -> None:
        if fields:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fields.items()}
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
