"""The DDIM timesteps of one edit, computed once: inversion grid, sampling schedule, kept latents, injection steps.

For SD 1.x/2.x (1000 training steps, "leading" spacing) a 500-step inversion walks t = 1, 3, ..., 999 and a
50-step sampling schedule is t = 981, 961, ..., 1 (noisiest first). The store keeps the inversion's latents
at every sampling timestep and at the last inversion timestep (the edit's starting noise).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from diffusers import DDIMInverseScheduler, DDIMScheduler

from tokenflow.errors import TokenFlowError


@dataclass(frozen=True)
class Schedule:
    scheduler_config: dict
    inversion: tuple[int, ...]  # inversion timesteps, ascending
    sampling: tuple[int, ...]  # all n_timesteps sampling timesteps, noisiest first
    kept: tuple[int, ...]  # timesteps whose inverted latents the store keeps, ascending
    first_step: int  # index into `sampling` of the first step run (SDEdit starts part-way)
    n_qk_steps: int  # Q/K injection while the step index < n_qk_steps
    n_conv_steps: int  # conv injection while the step index < n_conv_steps

    @classmethod
    def build(cls, scheduler_config: dict, *, n_inversion_steps: int, n_timesteps: int, mode: str = "pnp",
              start: float = 0.9, pnp_attn_t: float = 0.5, pnp_f_t: float = 0.8) -> "Schedule":
        inversion = tuple(int(t) for t in inverter(scheduler_config, n_inversion_steps).timesteps)
        sampling = tuple(int(t) for t in sampler(scheduler_config, n_timesteps).timesteps)
        missing = sorted(set(sampling) - set(inversion))
        if missing:
            raise TokenFlowError(grid_message(scheduler_config, n_inversion_steps, n_timesteps, missing[0]),
                                 key="n_inversion_steps")
        num_train = DDIMScheduler.from_config(scheduler_config).config.num_train_timesteps
        inject = mode != "sdedit"
        return cls(scheduler_config, inversion, sampling, tuple(sorted(set(sampling) | {inversion[-1]})),
                   first_step=start_index(mode, start, sampling, num_train),
                   n_qk_steps=int(n_timesteps * pnp_attn_t) if inject else 0,
                   n_conv_steps=int(n_timesteps * pnp_f_t) if inject else 0)

    @property
    def noisiest_kept(self) -> int:
        return self.kept[-1]

    @property
    def steps(self) -> range:
        """Indices into `sampling` of the steps an edit runs."""
        return range(self.first_step, len(self.sampling))

    def sampler(self) -> DDIMScheduler:
        return sampler(self.scheduler_config, len(self.sampling))

    def inverter(self) -> DDIMInverseScheduler:
        return inverter(self.scheduler_config, len(self.inversion))


def sampler(scheduler_config: dict, n_steps: int) -> DDIMScheduler:
    s = DDIMScheduler.from_config(scheduler_config)
    s.set_timesteps(n_steps)
    return s


def inverter(scheduler_config: dict, n_steps: int) -> DDIMInverseScheduler:
    s = DDIMInverseScheduler.from_config(scheduler_config)
    s.set_timesteps(n_steps)
    return s


def start_index(mode: str, start: float, sampling: tuple[int, ...] | list[int], num_train: int) -> int:
    """PnP starts at the first sampling timestep. SDEdit starts at the first timestep <= start * T
    (the intended t; the reference's slicing started one step later)."""
    if mode != "sdedit":
        return 0
    for i, t in enumerate(sampling):
        if t <= start * num_train:
            return i
    return len(sampling) - 1


def grid_message(scheduler_config: dict, n_inversion_steps: int, n_timesteps: int, example: int) -> str:
    """Why the sampling timesteps miss the inversion grid, and the nearest step counts that work.

    Both schedules space their steps by integer division of the training steps (T // n, "leading"
    spacing, plus the config's offset), so a sampling timestep lies on the inversion grid only when the
    sampling spacing is a multiple of the inversion spacing: n_timesteps dividing n_inversion_steps is not
    enough (12 and 4 give spacings 83 and 250)."""
    inv_s, samp_s = DDIMInverseScheduler.from_config(scheduler_config), DDIMScheduler.from_config(scheduler_config)

    grids: dict = {}

    def grid(s, n):
        if (s, n) not in grids:
            s.set_timesteps(n)
            grids[s, n] = {int(t) for t in s.timesteps}
        return grids[s, n]

    def fits(n_inv, n_t):
        return grid(samp_s, n_t) <= grid(inv_s, n_inv)

    T = samp_s.config.num_train_timesteps
    near_inv = list(islice((n for n in _nearest(n_inversion_steps, T) if fits(n, n_timesteps)), 2))
    near_t = list(islice((n for n in _nearest(n_timesteps, T) if fits(n_inversion_steps, n)), 2))
    options = [f"n_inversion_steps {n}" for n in near_inv] + [f"n_timesteps {n}" for n in near_t]
    return (f"the {n_timesteps} sampling timesteps are not all on the {n_inversion_steps}-step inversion grid "
            f"(t = {example} is not an inversion timestep): both space their steps by {T} // steps, so the "
            f"sampling spacing ({T // n_timesteps}) must be a multiple of the inversion spacing "
            f"({T // n_inversion_steps}); nearest valid: {' or '.join(options)}")


def _nearest(n: int, limit: int):
    """Up to 100 candidates in 2..limit: round counts (dividing the training steps) first, then the others,
    each group by distance from n."""
    return sorted(range(2, limit + 1), key=lambda m: (limit % m != 0, abs(m - n), m))[:100]
