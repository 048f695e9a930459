import pytest
import torch

from ee_diffusion.dllm.adapters import MaskedLMAdapter
from ee_diffusion.dllm.tasks import Problem, accuracy, make_problems
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
    assert accuracy(addition[:2], [addition[0].answer, "x"]) == 0.5
    with pytest.raises(ValueError, match="'addition', 'sorting', 'permutation', 'digitsum', 'longadd'"):
        make_problems("division", 1)


def test_puzzle_tasks_accept_every_valid_answer_and_only_those():
    for p in make_problems("permutation", 100, seed=1):
        digits = p.prompt.removeprefix("perm:").removesuffix("=")
        assert 4 <= len(digits) <= 10 and sorted(p.answer) == sorted(digits) and p.is_correct(p.answer)
        assert p.is_correct(digits) and p.is_correct(digits[::-1])  # any arrangement, not the drawn one only
        assert not p.is_correct(digits[1:]) and not p.is_correct(digits + "0")
    for p in make_problems("digitsum", 100, seed=1):
        length, total = map(int, p.prompt.removeprefix("dsum:").removesuffix("=").split(","))
        assert 2 <= length <= 5 and len(p.answer) == length and sum(map(int, p.answer)) == total
        assert p.is_correct(p.answer) and p.answer[0] != "0"
    problem = Problem("digitsum", "dsum:3,10=", "253")
    assert problem.is_correct("190") and problem.is_correct(" 325 ")
    assert not problem.is_correct("019") and not problem.is_correct("2521") and not problem.is_correct("254")
    assert not problem.is_correct("1-9")
    for p in make_problems("longadd", 100, seed=1):
        a, b = p.prompt[:-1].split("+")
        assert len(a) == len(b) == 6 and int(p.answer) == int(a) + int(b)
        assert not p.is_correct(str(int(p.answer) + 1))


def test_encoding_left_pads_prompts_and_pads_answers_with_eos(tokenizer):
    ids, mask, prompt_length = encode_problems(
        [Problem("addition", "1+2=", "3"), Problem("addition", "10+20=", "30")], tokenizer, gen_length=4
    )
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
    config = tiny_config(
        output_dir=str(tmp_path / "m"),
        steps=60,
        batch_size=32,
        warmup_steps=5,
        checkpoint_every=30,
        gen_length=18,
        max_prompt_length=22,
        learning_rate=3e-3,
    )
    losses = train_mdlm(config, progress=False)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "generation_config.json").exists()
    config.steps, config.resume = 70, True
    assert len(train_mdlm(config, progress=False)) == 10
    # A run stopped at step 30 and resumed is the uninterrupted run: the schedule is that of `steps` throughout.
    config.output_dir, config.steps, config.resume, config.stop_at = str(tmp_path / "halves"), 60, False, 30
    first = train_mdlm(config, progress=False)
    config.resume, config.stop_at = True, None
    assert first + train_mdlm(config, progress=False) == pytest.approx(losses, rel=1e-5)
    with pytest.raises(ValueError, match="Nothing to train: the run is at step 60 and would stop at step 60"):
        train_mdlm(config, progress=False)
    # another batch size, learning rate or seed is another run: refused, naming what differs
    config.steps, config.batch_size, config.seed = 70, 16, 7
    with pytest.raises(ValueError, match=r"written by another run \(batch_size: 32 there, 16 now; seed: 0 there, 7"):
        train_mdlm(config, progress=False)
    config.batch_size, config.seed = 32, 0
    state = tmp_path / "halves" / "checkpoint" / "training_state.pt"
    kept = state.read_bytes()
    state.write_bytes(kept[:100])  # cut short
    with pytest.raises(ValueError, match="it is not a readable checkpoint"):
        train_mdlm(config, progress=False)
    state.write_bytes(kept)
    config.stop_at = None
    # Each step's data comes from (seed, step): a DataLoader worker generating it changes nothing.
    config.output_dir, config.resume, config.steps = str(tmp_path / "again"), False, 60
    assert train_mdlm(config, progress=False, workers=1) == pytest.approx(losses, rel=1e-5)


def test_training_can_start_from_a_model_and_learn_other_tasks(tmp_path, tiny_bert, tokenizer):
    tiny_bert.save_pretrained(tmp_path / "start")
    config = tiny_config(
        output_dir=str(tmp_path / "m"),
        steps=1,
        batch_size=6,
        learning_rate=1e-12,
        warmup_steps=1,
        init_from=str(tmp_path / "start"),
        tasks=("digitsum",),
    )
    train_mdlm(config, progress=False)
    trained = type(tiny_bert).from_pretrained(tmp_path / "m")
    for name, weight in tiny_bert.state_dict().items():  # one step at lr 1e-12: still the starting weights
        torch.testing.assert_close(trained.state_dict()[name], weight, rtol=0, atol=1e-6)
    too_short = tiny_config(output_dir=str(tmp_path / "n"), init_from=str(tmp_path / "start"), gen_length=40)
    with pytest.raises(ValueError, match="training needs the character tokenizer's 48 tokens and 52 positions"):
        train_mdlm(too_short, progress=False)


def test_train_mdlm_writes_nowhere_unless_told_where(capsys):
    from ee_diffusion.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["train-mdlm", "--steps", "1"])  # the shipped tiny-mdlm is never a default destination
    assert stopped.value.code == 2 and "--out" in capsys.readouterr().err


def test_train_mdlm_writes_a_card_and_a_finished_run_resumed_leaves_nothing_behind(tmp_path, capsys):
    from ee_diffusion.cli import main

    out = tmp_path / "m"
    command = ["train-mdlm", "--out", str(out), "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2"]
    assert main([*command, "--stop-at", "2"]) == 0
    assert main([*command, "--resume"]) == 0
    card = (out / "README.md").read_text()
    assert f"ee-diffusion train-mdlm --out {out} --steps 4 --batch-size 4 --checkpoint-every 2\n" in card
    assert "Steps: 4, batch 4" in card and "for the last 2 steps" in card and "addition, sorting" in card
    before = sorted(path.name for path in tmp_path.iterdir())
    capsys.readouterr()
    assert main([*command, "--resume"]) == 2  # nothing left to train: said before anything is staged
    assert "Nothing to train: the run is at step 4 and would stop at step 4" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == before == ["m"]
