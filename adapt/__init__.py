"""Test-time adaptation of CLIP-family zero-shot classifiers: GS-Bias, its view generator, and
the ZERO / TPT peers. Pure tensor code, no model or server state."""
from adaptclip.adapt.gsbias import GSBiasResult, gs_bias, gs_bias_logits, marginal_entropy_and_grad
from adaptclip.adapt.peers import tpt_logits, zero_logits
from adaptclip.adapt.views import ViewGenerator

__all__ = ["GSBiasResult", "ViewGenerator", "gs_bias", "gs_bias_logits", "marginal_entropy_and_grad",
           "tpt_logits", "zero_logits"]
