import pytest
import torch

from ee_diffusion import MaskedDiffusionLMPipeline, SchEDCommit
from ee_diffusion.dllm.adapters import MaskedLMAdapter
from ee_diffusion.dllm.sampler import generate
from ee_diffusion.training.mdlm import save_model

from .conftest import tiny_config


@pytest.fixture
def model_folder(tmp_path, tiny_bert, tokenizer):
    save_model(tiny_bert, tokenizer, tiny_config(), str(tmp_path / "tiny"))
    return tmp_path / "tiny"


def test_from_pretrained_reads_model_tokenizer_and_generation_defaults(model_folder, tiny_bert, tokenizer):
    pipe = MaskedDiffusionLMPipeline.from_pretrained(model_folder)
    assert (pipe.config.gen_length, pipe.config.steps, pipe.config.block_length) == (8, 8, 8)
    assert (pipe.config.mask_token_id, pipe.config.eos_token_id) == (tokenizer.mask_token_id, tokenizer.eos_token_id)
    prompts = ["123+4567=", "sort:4312="]
    out = pipe(prompt=prompts)
    assert out.sequences.shape == (2, 8)
    assert ((1 <= out.nfe) & (out.nfe <= 8)).all()  # a row stops early once EOS ends it
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    direct = generate(MaskedLMAdapter(tiny_bert, 1), encoded["input_ids"], encoded["attention_mask"], gen_length=8,
                      steps=8, block_length=8, mask_token_id=1, eos_token_id=2)  # fmt: skip
    assert torch.equal(out.sequences, direct.sequences) and torch.equal(out.nfe, direct.nfe)
    for text, row in zip(out.texts, direct.sequences.tolist()):
        assert text == tokenizer.decode(row[: row.index(2)] if 2 in row else row, skip_special_tokens=True)


def test_call_settings_and_early_commit(model_folder):
    pipe = MaskedDiffusionLMPipeline.from_pretrained(model_folder)
    full = pipe(prompt="1+2=", gen_length=4, steps=4, block_length=2, eos_token_id=None)
    assert full.sequences.shape == (1, 4) and full.nfe.tolist() == [4]
    early = pipe(prompt="1+2=", gen_length=4, steps=4, early_commit=SchEDCommit(tau_high=0.0, tau_low=0.0))
    assert early.nfe.tolist() == [1]
    assert pipe(prompt="1+2=", early_commit="sched").nfe.shape == (1,)
    with pytest.raises(TypeError, match="early_commit"):
        pipe(prompt="1+2=", early_commit="fast")


def test_selection_options_pass_through_to_the_sampler(model_folder, tiny_bert, tokenizer):
    pipe = MaskedDiffusionLMPipeline.from_pretrained(model_folder)
    prompts = ["123+4567=", "sort:4312="]
    favourite = tokenizer.convert_tokens_to_ids("a")  # the random model's most frequent prediction here
    options = dict(confidence_dtype="float64", logits_inf_ids=[favourite], confidence_inf_ids=[2, 3])
    out = pipe(prompt=prompts, **options)
    assert (pipe(prompt=prompts).sequences == favourite).any() and not (out.sequences == favourite).any()
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    direct = generate(MaskedLMAdapter(tiny_bert, 1), encoded["input_ids"], encoded["attention_mask"], gen_length=8,
                      steps=8, block_length=8, mask_token_id=1, eos_token_id=2, **options)  # fmt: skip
    assert torch.equal(out.sequences, direct.sequences)
    with pytest.raises(ValueError, match="confidence_dtype"):
        pipe(prompt="1+2=", confidence_dtype="int8")


def test_model_and_tokenizer_directly_and_save_round_trip(tmp_path, tiny_bert, tokenizer):
    pipe = MaskedDiffusionLMPipeline(model=tiny_bert, tokenizer=tokenizer, gen_length=8, steps=4)
    with pytest.raises(ValueError, match="gen_length"):
        MaskedDiffusionLMPipeline(model=tiny_bert, tokenizer=tokenizer)(prompt="1+2=")
    before = pipe(prompt=["1+2=", "33+4="])
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = MaskedDiffusionLMPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.steps == 4
    assert torch.equal(loaded(prompt=["1+2=", "33+4="]).sequences, before.sequences)


@pytest.mark.parametrize("call, match", [
    (dict(temperature=float("nan")), r"`temperature` must be a finite number >= 0, got nan"),
    (dict(temperature=-1.0), r"`temperature` must be a finite number >= 0, got -1.0"),
    (dict(cfg_scale=float("inf")), r"`cfg_scale` must be a finite number >= 0, got inf"),
    (dict(prompt="12×3="), r"characters the tokenizer does not know"),
    (dict(steps=0), r"`steps` must be an integer >= 1, got 0"),  # not "the model's default steps"
    (dict(gen_length=0), r"`gen_length` must be an integer >= 1, got 0"),
    (dict(block_length=0), r"`block_length` must be an integer >= 1, got 0"),
])  # fmt: skip
def test_bad_call_arguments_raise_instead_of_a_silent_wrong_answer(model_folder, call, match):
    pipe = MaskedDiffusionLMPipeline.from_pretrained(model_folder)
    with pytest.raises(ValueError, match=match):
        pipe(**{"prompt": "1+2=", **call})
