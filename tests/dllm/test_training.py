import pytest
import torch

from ee_diffusion.dllm.adapters import MaskedLMAdapter
from ee_diffusion.dllm.tasks import Problem, exact_match, make_problems
from ee_diffusion.training.mdlm import build_model, encode_problems, mdlm_loss, train_mdlm

from .conftest import tiny_config


def test_tasks_are_fresh_and_well_formed():
    addition = make_problems("addition", 200, seed=1)
    sorting = make_problems("sorting", 200, seed=1)
    for p in addition:
        a, b = p.prompt[:-1].split("+")
        assert 1 <= len(a) <= 4 and 1 <= len(b) <= 4 and int(p.answer) == int(a) + int(b)
    for p in sorting:
        digits = p.prompt[len("sort:") : -1]
        assert 4 <= len(digits) <= 16 and p.answer == "".join(sorted(digits))
    assert {len(p.prompt) for p in sorting} == set(range(10, 23))
    assert make_problems("addition", 5, seed=2) != make_problems("addition", 5, seed=3)
    assert exact_match(addition[:2], [addition[0].answer, "x"]) == 0.5
    with pytest.raises(ValueError, match="'addition', 'sorting'"):
        make_problems("division", 1)


def test_encoding_left_pads_prompts_and_pads_answers_with_eos(tokenizer):
    ids, mask, prompt_length = encode_problems([Problem("addition", "1+2=", "3"), Problem("addition", "10+20=", "30")],
                                               tokenizer, gen_length=4)  # fmt: skip
    assert prompt_length == 6
    assert tokenizer.decode(ids[0]) == "[PAD][PAD]1+2=3[EOS][EOS][EOS]"
    assert mask[0].tolist() == [0, 0] + [1] * 8


def test_loss_never_masks_the_prompt(tokenizer):
    seen = []

    class Spy(MaskedLMAdapter):
        def __call__(self, input_ids, attention_mask=None):
            seen.append(input_ids)
            return super().__call__(input_ids, attention_mask)

    torch.manual_seed(0)
    model = build_model(tokenizer, tiny_config(gen_length=18, max_prompt_length=22))
    ids, mask, prompt_length = encode_problems(make_problems("sorting", 16), tokenizer, gen_length=18)
    loss = mdlm_loss(Spy(model, tokenizer.mask_token_id), ids, mask, prompt_length, torch.Generator().manual_seed(0))
    assert torch.equal(seen[0][:, :prompt_length], ids[:, :prompt_length])
    assert (seen[0][:, prompt_length:] == tokenizer.mask_token_id).any()
    assert loss.item() > 0


def test_training_reduces_the_loss_and_resumes(tmp_path):
    config = tiny_config(output_dir=str(tmp_path / "m"), steps=60, batch_size=32, warmup_steps=5, checkpoint_every=30,
                         gen_length=18, max_prompt_length=22, learning_rate=3e-3)  # fmt: skip
    losses = train_mdlm(config, progress=False)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "generation_config.json").exists()
    config.steps, config.resume = 70, True
    assert len(train_mdlm(config, progress=False)) == 10
    # Each step's data comes from (seed, step): a DataLoader worker generating it changes nothing.
    config.output_dir, config.resume, config.steps = str(tmp_path / "again"), False, 60
    assert train_mdlm(config, progress=False, workers=1) == pytest.approx(losses, rel=1e-5)


def test_train_mdlm_writes_nowhere_unless_told_where(capsys):
    from ee_diffusion.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["train-mdlm", "--steps", "1"])  # the shipped tiny-mdlm is never a default destination
    assert stopped.value.code == 2 and "--out" in capsys.readouterr().err
