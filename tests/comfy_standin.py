"""A stand-in for the parts of ComfyUI that `ztsnr_nb.comfyui.adapter` touches, written from ComfyUI's interfaces
(Comfy-Org/ComfyUI: comfy/model_sampling.py, comfy/samplers.py, comfy/model_patcher.py, comfy/model_base.py):

* `comfy.model_sampling`: `ModelSamplingDiscrete(model_config, zsnr)` (scaled-linear β from `sampling_settings`,
  the zero-terminal-SNR rescale with ᾱ_T = 4.8973451890853435e-08, `set_sigmas`, `sigmas` ascending,
  `sigma_min`/`sigma_max`, `timestep(σ)` = nearest log σ, `sigma(t)`), `EPS` and `V_PREDICTION`
  (`calculate_input`, `calculate_denoised`, `noise_scaling`, `inverse_noise_scaling`);
* `comfy.model_patcher.ModelPatcher`: `clone`, `add_object_patch`, `get_model_object`, `model_options`,
  `set_model_sampler_cfg_function` (3-argument functions wrapped the old way);
* `comfy.samplers`: `CFGGuider(set_conds, set_cfg, sample)` with `process_latent_in/out`, conds → SDXL size
  conditioning (`encode_adm` defaults), CFG through `sampler_cfg_function(args)` with args `cond = x − x̂₀(cond)`
  etc.; `KSAMPLER(sampler_function).sample` (noise scaling, `KSamplerX0Inpaint` carrying `latent_image` and `noise`).

The model is the solid-image oracle (`ztsnr_nb.inference.upscale.SolidOracleUNet`) predicting v; `SEEN_CONDS`
records the SDXL size conditioning of every model call.
"""
import copy
import inspect
import math
import sys
import types

import torch

from ztsnr_nb.inference.upscale import SolidOracleUNet

COMFY_TERMINAL_ALPHA_BAR = 4.8973451890853435e-08
SEEN_CONDS: list = []


def _reshape(sigma, ndim):
    return sigma.view(()) if sigma.nelement() == 1 else sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


# ---------------------------------------------------------------- comfy.model_sampling
class EPS:
    def calculate_input(self, sigma, noise):
        return noise / (_reshape(sigma, noise.ndim) ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * _reshape(sigma, model_output.ndim)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = _reshape(sigma, noise.ndim)
        return (noise * torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else noise * sigma) + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class V_PREDICTION(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        s, d = _reshape(sigma, model_output.ndim), self.sigma_data
        return model_input * d ** 2 / (s ** 2 + d ** 2) - model_output * s * d / (s ** 2 + d ** 2) ** 0.5


class ModelSamplingDiscrete(torch.nn.Module):
    def __init__(self, model_config=None, zsnr=None):
        super().__init__()
        st = model_config.sampling_settings if model_config is not None else {}
        assert st.get('beta_schedule', 'linear') == 'linear'
        a, b, T = st.get('linear_start', 0.00085), st.get('linear_end', 0.012), st.get('timesteps', 1000)
        self.zsnr = st.get('zsnr', False) if zsnr is None else zsnr
        betas = torch.linspace(a ** 0.5, b ** 0.5, T, dtype=torch.float64) ** 2
        ab = torch.cumprod(1 - betas, 0)
        if self.zsnr:                                    # Lin et al. Algorithm 1 on sqrt(ᾱ), ComfyUI's terminal ᾱ
            s = ab.sqrt()
            s0, sT = s[0].clone(), s[-1].clone()
            s = (s - sT) * s0 / (s0 - sT)
            ab = s * s
            ab[-1] = COMFY_TERMINAL_ALPHA_BAR
        self.num_timesteps = T
        self.sigma_data = 1.0
        self.set_sigmas(((1 - ab) / ab) ** 0.5)

    def set_sigmas(self, sigmas):
        self.register_buffer('sigmas', sigmas.float())
        self.register_buffer('log_sigmas', sigmas.log().float())

    @property
    def sigma_min(self): return self.sigmas[0]

    @property
    def sigma_max(self): return self.sigmas[-1]

    def timestep(self, sigma):
        d = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return d.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = timestep.float().clamp(0, len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()


class _EpsDiscrete(ModelSamplingDiscrete, EPS):
    pass


# ---------------------------------------------------------------- comfy.model_base (a tiny SDXL-like model)
class LatentFormatSDXL:
    scale_factor = 0.13025
    def process_in(self, latent): return latent * self.scale_factor
    def process_out(self, latent): return latent / self.scale_factor


class SamplingSettings:
    def __init__(self, **settings): self.sampling_settings = dict(settings)


class BaseModel(torch.nn.Module):
    "model_base.BaseModel's surface: model_config, model_sampling, latent_format, process_latent_in/out, apply_model."
    def __init__(self, sampling_settings=None):
        super().__init__()
        self.model_config = SamplingSettings(**(sampling_settings or {}))
        self.model_sampling = _EpsDiscrete(self.model_config)      # a checkpoint without v_pred/ztsnr keys loads as EPS
        self.latent_format = LatentFormatSDXL()
        self.diffusion_model = SolidOracleUNet()

    def process_latent_in(self, latent): return self.latent_format.process_in(latent)
    def process_latent_out(self, latent): return self.latent_format.process_out(latent)

    def encode_adm(self, **kw):
        "SDXL's size conditioning with model_base.SDXL.encode_adm's defaults (768, crops 0, target = size)."
        w, h = kw.get('width', 768), kw.get('height', 768)
        return dict(width=w, height=h, crop_w=kw.get('crop_w', 0), crop_h=kw.get('crop_h', 0),
                    target_width=kw.get('target_width', w), target_height=kw.get('target_height', h))

    def apply_model(self, x, sigma, ms, cond: dict):
        SEEN_CONDS.append(self.encode_adm(**cond))
        xc = ms.calculate_input(sigma, x)
        out = self.diffusion_model(xc, ms.timestep(sigma).float())[0]
        return ms.calculate_denoised(sigma, out.to(x.dtype), x)


def model_class(kind: str):
    return type(kind, (BaseModel,), {})


# ---------------------------------------------------------------- comfy.model_patcher
class ModelPatcher:
    def __init__(self, model, load_device='cpu', offload_device='cpu'):
        self.model, self.load_device, self.offload_device = model, torch.device(load_device), torch.device(offload_device)
        self.object_patches = {}
        self.model_options = {'transformer_options': {}}

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.copy(self.model_options)
        n.model_options['transformer_options'] = dict(self.model_options['transformer_options'])
        return n

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches: return self.object_patches[name]
        obj = self.model
        for part in name.split('.'): obj = getattr(obj, part)
        return obj

    def set_model_sampler_cfg_function(self, sampler_cfg_function, disable_cfg1_optimization=False):
        if len(inspect.signature(sampler_cfg_function).parameters) == 3:
            self.model_options['sampler_cfg_function'] = lambda a: sampler_cfg_function(a['cond'], a['uncond'], a['cond_scale'])
        else:
            self.model_options['sampler_cfg_function'] = sampler_cfg_function
        if disable_cfg1_optimization: self.model_options['disable_cfg1_optimization'] = True


# ---------------------------------------------------------------- comfy.samplers
class _Inner:
    "The model as the sampler sees it: object patches applied (ComfyUI patches the module while sampling)."
    def __init__(self, patcher):
        self.model = patcher.model
        self.model_sampling = patcher.get_model_object('model_sampling')
    def process_latent_in(self, x): return self.model.process_latent_in(x)
    def process_latent_out(self, x): return self.model.process_latent_out(x)
    def apply_model(self, x, sigma, cond): return self.model.apply_model(x, sigma, self.model_sampling, cond)


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}):
    if 'sampler_cfg_function' in model_options:
        args = {'cond': x - cond_pred, 'uncond': x - uncond_pred, 'cond_scale': cond_scale, 'timestep': timestep, 'input': x,
                'sigma': timestep, 'cond_denoised': cond_pred, 'uncond_denoised': uncond_pred, 'model': model, 'model_options': model_options}
        return x - model_options['sampler_cfg_function'](args)
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    c = model.apply_model(x, timestep, cond)
    if math.isclose(cond_scale, 1.0) and not model_options.get('disable_cfg1_optimization', False): return c
    return cfg_function(model, c, model.apply_model(x, timestep, uncond), cond_scale, x, timestep, model_options)


class KSamplerX0Inpaint:
    def __init__(self, model, sigmas):
        self.inner_model, self.sigmas = model, sigmas

    def __call__(self, x, sigma, denoise_mask=None, model_options={}, seed=None):
        if denoise_mask is not None:
            x = x * denoise_mask + (self.latent_image + self.noise * sigma.view(-1, 1, 1, 1)) * (1 - denoise_mask)
        out = self.inner_model(x, sigma, model_options=model_options, seed=seed)
        if denoise_mask is not None: out = out * denoise_mask + self.latent_image * (1 - denoise_mask)
        return out


class KSAMPLER:
    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):
        self.sampler_function, self.extra_options, self.inpaint_options = sampler_function, extra_options, inpaint_options

    def max_denoise(self, model_wrap, sigmas):
        mx, s = float(model_wrap.inner_model.model_sampling.sigma_max), float(sigmas[0])
        return math.isclose(mx, s, rel_tol=1e-05) or s > mx

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        extra_args['denoise_mask'] = denoise_mask
        model_k = KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        ms = model_wrap.inner_model.model_sampling
        x = ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        samples = self.sampler_function(model_k, x, sigmas, extra_args=extra_args, callback=None, disable=disable_pbar, **self.extra_options)
        return ms.inverse_noise_scaling(sigmas[-1], samples)


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher, self.model_options, self.original_conds, self.cfg = model_patcher, model_patcher.model_options, {}, 1.0

    def set_conds(self, positive, negative):
        for k, c in (('positive', positive), ('negative', negative)):
            assert isinstance(c, list) and all(len(p) == 2 and torch.is_tensor(p[0]) and isinstance(p[1], dict) for p in c)
            self.original_conds[k] = [dict(p[1], cross_attn=p[0]) for p in c]

    def set_cfg(self, cfg):
        self.cfg = cfg

    def __call__(self, x, timestep, model_options={}, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds['negative'][0], self.conds['positive'][0], self.cfg,
                                 model_options=model_options, seed=seed)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        if sigmas.shape[-1] == 0: return latent_image
        assert sigmas.ndim == 1 and sigmas.dtype == torch.float32 and sigmas[-1] == 0 and (sigmas[1:] <= sigmas[:-1]).all(), 'SIGMAS convention'
        self.inner_model = _Inner(self.model_patcher)
        self.conds = {k: [dict(c) for c in v] for k, v in self.original_conds.items()}
        if torch.count_nonzero(latent_image) > 0: latent_image = self.inner_model.process_latent_in(latent_image)
        extra_args = {'model_options': dict(self.model_options), 'seed': seed}
        samples = sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        return self.inner_model.process_latent_out(samples.to(torch.float32))


# ---------------------------------------------------------------- helpers for tests
class SolidVAE:
    "comfy.sd.VAE's surface: encode(IMAGE (B, H, W, 3) in [0, 1]) → raw latent (B, 4, H/8, W/8); decode → IMAGE. Gray ↔ solid latent."
    def encode(self, pixels):
        assert pixels.ndim == 4 and pixels.shape[-1] == 3
        g = torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2).mean(1, keepdim=True), 8)
        return ((2 * g - 1) / LatentFormatSDXL.scale_factor).expand(-1, 4, -1, -1).contiguous()

    def decode(self, samples):
        p = (samples.mean(1, keepdim=True) * LatentFormatSDXL.scale_factor + 1) / 2
        return torch.nn.functional.interpolate(p, scale_factor=8, mode='nearest').expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()


def conditioning():
    "ComfyUI CONDITIONING of SDXL's shapes: [[context (1, 77, 2048), {'pooled_output': (1, 1280)}]]."
    return [[torch.zeros(1, 77, 2048), {'pooled_output': torch.zeros(1, 1280)}]]


def oracle_model_patcher(kind: str = 'SDXL', **sampling_settings):
    "A ModelPatcher around a model of class `kind` (its MRO names are what the adapter checks)."
    return ModelPatcher(model_class(kind)(sampling_settings))


_SAVED: dict = {}


def install():
    "Put the stand-in `comfy`, `comfy.model_sampling`, `comfy.samplers`, `comfy.model_patcher` into sys.modules."
    mods = {}
    for name in ('comfy', 'comfy.model_sampling', 'comfy.samplers', 'comfy.model_patcher'):
        _SAVED[name] = sys.modules.get(name)
        mods[name] = sys.modules[name] = types.ModuleType(name)
    for k in ('EPS', 'V_PREDICTION', 'ModelSamplingDiscrete'): setattr(mods['comfy.model_sampling'], k, globals()[k])
    for k in ('CFGGuider', 'KSAMPLER', 'KSamplerX0Inpaint', 'sampling_function', 'cfg_function'): setattr(mods['comfy.samplers'], k, globals()[k])
    mods['comfy.model_patcher'].ModelPatcher = ModelPatcher
    for sub in ('model_sampling', 'samplers', 'model_patcher'): setattr(mods['comfy'], sub, mods[f'comfy.{sub}'])
    SEEN_CONDS.clear()


def uninstall():
    for name, mod in _SAVED.items():
        if mod is None: sys.modules.pop(name, None)
        else: sys.modules[name] = mod
    _SAVED.clear()
