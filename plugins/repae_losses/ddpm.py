"""DiT's training objective: discrete-time DDPM with noise prediction and a learned variance.

DDPM: Ho et al., "Denoising Diffusion Probabilistic Models", arXiv 2006.11239. Learned variance and the hybrid loss:
Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", arXiv 2102.09672. DiT (Peebles & Xie,
arXiv 2212.09748) trains with 1000 steps of the linear schedule (betas 1e-4 .. 0.02), epsilon prediction, and the
variance interpolation ``log var = f log beta_t + (1 - f) log beta~_t``, ``f = (v + 1) / 2``.

Loss per sample: ``mean_flat((eps - eps_pred)^2) + L_vb`` where ``L_vb`` is, in bits per dimension, the KL between
the true posterior ``q(x_{t-1} | x_t, x0)`` and the model's ``p(x_{t-1} | x_t)`` built from the *detached* noise
prediction and the learned variance (so the VLB trains only the variance), and at ``t = 0`` the negative
log-likelihood of ``x0`` under a Gaussian discretised to 256 bins on ``[-1, 1]`` (kept as is on latents, as DiT).
Without variance channels (a denoiser with ``learn_sigma: false``) the loss is the MSE alone (fixed variance).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from repae import BuildContext, Loss, StepContext
from repae_losses import DDPMConfig
from repae_losses.common import per_sample_mean

__all__ = [
    "DDPMLoss",
    "DDPMTransport",
    "build_ddpm",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "normal_kl",
]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """ADM's linear schedule in float64: ``linspace(s * beta_start, s * beta_end, T)`` with ``s = 1000 / T``."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64, device="cpu")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).square() * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF used by the reference implementations."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of ``x`` in ``[-1, 1]`` under N(mean, exp(log_scale)^2) discretised into
    256 bins of width 2/255; the outermost bins extend to -inf / +inf."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DDPMTransport:
    """:class:`repae.interfaces.Transport` of discrete DDPM: ``t`` is the integer step ``[B]`` (int64, 0..T-1),
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, the target is ``eps``, and the denoiser receives ``t`` itself.

    Schedule tables are float64 (CPU); a lookup is cast to float32, as the reference does.
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        betas = linear_betas(num_timesteps, beta_start, beta_end)  # float64 tables on CPU, whatever the device
        self.num_timesteps = num_timesteps
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        one = torch.ones(1, dtype=torch.float64, device="cpu")
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t = 0: its log is clipped to the value at t = 1
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)

    @property
    def discrete_steps(self) -> int:
        """:attr:`repae.Transport.discrete_steps`: ``t`` is an integer step in ``[0, num_timesteps)``."""
        return self.num_timesteps

    @staticmethod
    def lookup(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` as float32, shaped ``[B, 1, ..., 1]`` to broadcast against ``like``."""
        values = table.to(t.device)[t.detach().long()].float().to(like.device)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    # -- Transport ---------------------------------------------------------------------------------------------
    def sample_time(self, batch: int, *, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=generator.device)

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.lookup(self.sqrt_alphas_cumprod, t, x0) * x0 + self.lookup(
            self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise

    def model_time(self, t: Tensor) -> Tensor:
        return t

    # -- the variational bound ---------------------------------------------------------------------------------
    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of ``q(x_{t-1} | x_t, x0)``."""
        coef1 = self.lookup(self.posterior_mean_coef1, t, x_t)
        mean = coef1 * x0 + self.lookup(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self.lookup(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

    def p_mean_logvar(self, eps: Tensor, var_values: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The model's ``p(x_{t-1} | x_t)`` from a noise prediction and variance values ``v`` in [-1, 1]."""
        min_log = self.lookup(self.posterior_log_variance_clipped, t, x_t)
        max_log = self.lookup(self.log_betas, t, x_t)
        frac = (var_values + 1) / 2
        logvar = frac * max_log + (1 - frac) * min_log
        x0_pred = self.lookup(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self.lookup(
            self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        mean, _ = self.q_posterior(x0_pred, x_t, t)
        return mean, logvar

    def vb_terms(self, eps: Tensor, var_values: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The per-sample VLB term in bits per dimension ``[B]``: KL(q || p) for ``t > 0``, the discretised decoder
        negative log-likelihood of ``x0`` for ``t = 0``."""
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        mean, logvar = self.p_mean_logvar(eps, var_values, x_t, t)
        kl = per_sample_mean(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = -per_sample_mean(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def __repr__(self) -> str:
        first, last = float(self.betas[0]), float(self.betas[-1])
        return f"DDPMTransport(num_timesteps={self.num_timesteps}, betas={first:g}..{last:g})"


class DDPMLoss(Loss):
    """DiT's loss; provides the step's :attr:`transport`. Terms: ``loss``, ``mse`` and (learned variance) ``vb``."""

    needs_prediction = True

    def __init__(self, config: DDPMConfig) -> None:
        super().__init__(config)
        self.transport: DDPMTransport = DDPMTransport(config.num_timesteps, config.beta_start, config.beta_end)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        prediction = ctx.prediction.float()
        x0, x_t, noise, t = ctx.x0.float(), ctx.x_t.float(), ctx.target.float(), ctx.t
        channels = noise.shape[1]
        if prediction.shape[1] == channels:
            mse = per_sample_mean((noise - prediction).square())
            return {"loss": mse.mean()}
        if prediction.shape[1] != 2 * channels:
            raise ValueError(f"ddpm expects a prediction with {channels} (noise) or {2 * channels} (noise and "
                             f"variance) channels, got {prediction.shape[1]}")
        eps, var_values = prediction.split(channels, dim=1)
        mse = per_sample_mean((noise - eps).square())
        vb = self.transport.vb_terms(eps.detach(), var_values, x0, x_t, t)
        return {"loss": (mse + vb).mean(), "mse": mse.mean().detach(), "vb": vb.mean().detach()}

    def extra_repr(self) -> str:
        return f"{self.transport!r}, {super().extra_repr()}"


def build_ddpm(config: DDPMConfig, context: BuildContext) -> DDPMLoss:
    """Registry factory of ``ddpm``."""
    return DDPMLoss(config)
