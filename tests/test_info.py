"""`uniultra info` reports the numbers SPEC section 1 lists for the official presets."""

from __future__ import annotations

import json

import pytest

from uniultra.cli import main

# (image-encoder parameters in M, encoder GFLOPs at 1024 with attention counted); None: not published.
SPEC = {
    "tiny": (27.22, 290.8),
    "small": (34.32, 358.5),
    "base_plus": (69.11, 645.1),
    "large": (212.70, 1821.2),
    "mini": (0.820, None),
}


@pytest.mark.parametrize("name", list(SPEC))
def test_info_matches_spec(name, capsys):
    assert main(["info", "--preset", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    params_m, gflops = SPEC[name]
    assert info["encoder_params"] / 1e6 == pytest.approx(params_m, abs=0.005)
    assert info["trunk_params"] + info["neck_params"] == info["encoder_params"]
    whole = info["encoder_params"] + info["prompt_encoder_params"] + info["mask_decoder_params"]
    assert info["whole_params"] == whole + 256  # + no_mem_embed
    if gflops is not None:
        assert info["encoder_gflops"] == pytest.approx(gflops, abs=0.1)


def test_flops_scale_with_input_size(capsys):
    main(["info", "--preset", "tiny", "--size", "512", "--json"])
    small = json.loads(capsys.readouterr().out)["encoder_gflops"]
    # Convolutions and windowed attention scale with the pixel count, global attention with its square.
    assert 290.8 / 16 < small < 290.8 / 4


def test_table_output_names_every_part(capsys):
    main(["info", "--preset", "mini", "--size", "256"])
    out = capsys.readouterr().out
    for part in ("Hiera trunk", "FPN neck", "image encoder (trunk + neck)", "mask decoder", "whole image model"):
        assert part in out


def test_bad_size_is_a_clear_error(capsys):
    assert main(["info", "--preset", "tiny", "--size", "1000"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_flops_count_the_peft_modules():
    from uniultra.evaluation.model_info import count_model_flops
    from uniultra.models.config import preset
    from uniultra.models.image_model import SAM2ImageModel
    from uniultra.peft.apply import apply_peft

    plain = SAM2ImageModel(preset("mini", 256))
    adapted = SAM2ImageModel(preset("mini", 256))
    apply_peft(adapted, {"method": "ch_adapter"})
    plain_encoder, plain_projection, plain_decoder = count_model_flops(plain)
    encoder, projection, decoder = count_model_flops(adapted)
    assert encoder > plain_encoder  # every adapted block runs its adapter too
    assert (projection, decoder) == (plain_projection, plain_decoder)
