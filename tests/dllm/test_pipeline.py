import pytest
import torch

from ee_diffusion import MaskedDiffusionLMPipeline, SchEDCommit, ThresholdCommit
from ee_diffusion.dllm.adapters import MaskedLMAdapter
from ee_diffusion.dllm.sampler import generate
from ee_diffusion.training.mdlm import save_model

from .conftest import ForwardCounter, tiny_config


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
    direct = generate(
        MaskedLMAdapter(tiny_bert, 1),
        encoded["input_ids"],
        encoded["attention_mask"],
        gen_length=8,
        steps=8,
        block_length=8,
        mask_token_id=1,
        eos_token_id=2,
    )
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
    direct = generate(
        MaskedLMAdapter(tiny_bert, 1),
        encoded["input_ids"],
        encoded["attention_mask"],
        gen_length=8,
        steps=8,
        block_length=8,
        mask_token_id=1,
        eos_token_id=2,
        **options,
    )
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


@pytest.fixture(scope="module")
def shipped():
    """The shipped tiny-mdlm (gen_length, steps, block_length 18; 40 positions), with a count of its forward passes."""
    pipe = MaskedDiffusionLMPipeline.from_pretrained("tiny-mdlm")
    return pipe, ForwardCounter(pipe.model)


IDS = torch.tensor([[5, 6, 7, 8]])
FAST_DLLM = ThresholdCommit(0.9)


@pytest.mark.parametrize(
    "call, error, match",
    [
        # the prompt
        (dict(prompt=None), ValueError, r"Give `prompt` or `input_ids`\."),
        (dict(prompt=[]), ValueError, r"`prompt` must be a text or a non-empty list of texts, got an empty list"),
        (dict(prompt=""), ValueError, r"`prompt` must be a non-empty text, got ''"),
        (dict(prompt="  \n"), ValueError, r"`prompt` must be a non-empty text, got '  \\n'"),
        (dict(prompt=["1+2=", " "]), ValueError, r"`prompt\[1\]` must be a non-empty text, got ' '"),
        (dict(prompt=12), TypeError, r"`prompt` must be a text or a list of texts, got int 12"),
        (dict(prompt=["1+2=", 3]), TypeError, r"`prompt\[1\]` must be a text \(str\), got int 3"),
        (dict(prompt="12×3="), ValueError, r"The prompt '12×3=' has characters the tokenizer does not know"),
        (
            dict(prompt="1" * 30),
            ValueError,
            r"The prompt \(30 tokens\) and the answer \(`gen_length` 18\) make 48 positions, more than the model "
            r"takes \(its `max_position_embeddings` is 40\); shorten the prompt or `gen_length`",
        ),
        (
            dict(prompt=["1+2=", "1" * 25]),
            ValueError,
            r"The prompt \(25 tokens, the longest of the batch\) and the answer \(`gen_length` 18\) make 43 positions",
        ),
        (
            dict(prompt="1+2=", input_ids=IDS),
            ValueError,
            r"Give `prompt` or `input_ids` \(with its `attention_mask`\), not both",
        ),
        (dict(prompt="1+2=", attention_mask=torch.ones(1, 4)), ValueError, r"`attention_mask` goes with `input_ids`"),
        # input_ids and attention_mask
        (dict(input_ids=[[5, 6]]), TypeError, r"`input_ids` must be a torch tensor of token ids, got list"),
        (
            dict(input_ids=IDS[0]),
            ValueError,
            r"`input_ids` must be a \(batch, prompt_length\) integer tensor with at least one token, got shape \(4,\) "
            r"and dtype torch.int64",
        ),
        (
            dict(input_ids=IDS.float()),
            ValueError,
            r"integer tensor with at least one token, got shape \(1, 4\) and dtype "
            r"torch.float32",
        ),
        (dict(input_ids=IDS[:, :0]), ValueError, r"at least one token, got shape \(1, 0\)"),
        (
            dict(input_ids=IDS + 100),
            ValueError,
            r"`input_ids` must be token ids from 0 to 47 \(the model's vocabulary\), "
            r"got values from 105 to 108",
        ),
        (
            dict(input_ids=IDS, attention_mask=torch.ones(1, 3)),
            ValueError,
            r"`attention_mask` must have the shape of `input_ids` \(1, 4\), got \(1, 3\)",
        ),
        (
            dict(input_ids=IDS, attention_mask=torch.tensor([[0, 2, 1, 1]])),
            ValueError,
            r"`attention_mask` must hold only 0 \(padding\) and 1 \(a prompt token\), got the values \[0, 1, 2\]",
        ),
        (
            dict(input_ids=IDS, attention_mask=torch.tensor([[1, 1, 0, 0]])),
            ValueError,
            r"`attention_mask` must pad on the left, .* got row 0: \[1, 1, 0, 0\]",
        ),
        (
            dict(input_ids=IDS.expand(2, -1), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])),
            ValueError,
            r"at least one 1 .* got row 1: \[0, 0, 0, 0\]",
        ),
        # lengths and steps
        (dict(steps=0), ValueError, r"`steps` must be an integer >= 1, got 0"),  # not "the model's default steps"
        (dict(gen_length=0), ValueError, r"`gen_length` must be an integer >= 1, got 0"),
        (dict(block_length=0), ValueError, r"`block_length` must be an integer >= 1, got 0"),
        (dict(steps=2.5), TypeError, r"`steps` must be an integer, got 2.5"),
        (
            dict(gen_length=10, block_length=4),
            ValueError,
            r"`gen_length` \(10\) must be a multiple of `block_length` \(4\): the answer is decoded in blocks",
        ),
        (
            dict(gen_length=24),
            ValueError,
            r"`gen_length` \(24\) must be a multiple of `block_length` \(18, the model's default\)",
        ),
        (
            dict(gen_length=8, block_length=4, steps=3),
            ValueError,
            r"`steps` \(3\) must be a multiple of the number of blocks \(2 = `gen_length` 8 / `block_length` 4\)",
        ),
        (
            dict(gen_length=36, block_length=9),
            ValueError,
            r"`steps` \(18, the model's default\) must be a multiple of the number of blocks \(4 = `gen_length` 36",
        ),
        # settings
        (dict(temperature=float("nan")), ValueError, r"`temperature` must be a finite number >= 0, got nan"),
        (dict(temperature=-1.0), ValueError, r"`temperature` must be a finite number >= 0, got -1.0"),
        (dict(cfg_scale=float("inf")), ValueError, r"`cfg_scale` must be a finite number >= 0, got inf"),
        (
            dict(remasking="lowest"),
            ValueError,
            r"`remasking` must be one of \('low_confidence', 'random'\), got 'lowest'",
        ),
        (
            dict(early_commit="fast"),
            TypeError,
            r"`early_commit` must be None, 'prophet', 'sched' or a rule such as ProphetCommit\(\) or SchEDCommit\(\); "
            r"got 'fast'",
        ),
        (dict(early_commit=7.5), TypeError, r"`early_commit` must be None, 'prophet', 'sched' .*; got 7.5"),
        (dict(parallel=0.9), TypeError, r"`parallel` must be None or a ThresholdCommit, got 0.9"),
        (dict(parallel=FAST_DLLM, remasking=None), ValueError, r"`remasking` must be one of .* got None"),
        (dict(confidence_dtype="int8"), ValueError, r"`confidence_dtype` must be None .* got 'int8'"),
        (dict(parallel=FAST_DLLM, remasking="random"), ValueError, r"under remasking='random' the confidences are"),
        # token ids: integers inside the vocabulary (0 is one like any other)
        (dict(mask_token_id=-1), ValueError, r"`mask_token_id` must be an integer >= 0, got -1"),
        (dict(mask_token_id=10**6), ValueError, r"`mask_token_id` must be a token id from 0 to 47 .* got 1000000"),
        (dict(mask_token_id="a"), TypeError, r"`mask_token_id` must be an integer, got 'a'"),
        (dict(eos_token_id="x"), TypeError, r"`eos_token_id` must be an integer, got 'x'"),
        (dict(eos_token_id=1.5), TypeError, r"`eos_token_id` must be an integer, got 1.5"),
        (dict(logits_inf_ids=[10**6]), ValueError, r"`logits_inf_ids\[0\]` must be a token id from 0 to 47"),
        (dict(confidence_inf_ids=[-2]), ValueError, r"`confidence_inf_ids\[0\]` must be an integer >= 0"),
        # the tokens that mark positions, spelled in the prompt
        (dict(prompt="[MASK]1+1="), ValueError, r"spells the mask token \('\[MASK\]'\)"),
        (dict(prompt="1+1=[PAD]"), ValueError, r"spells the padding token"),
        # the KV cache
        (
            dict(cache_refresh_every=3),
            ValueError,
            r"`cache_refresh_every` only applies with `kv_cache` \(one of \('prefix', 'dual'\)\), got "
            r"cache_refresh_every=3 with kv_cache=None",
        ),
        (
            dict(kv_cache="triple"),
            ValueError,
            r"`kv_cache` must be None \(off\) or one of \('prefix', 'dual'\), got 'triple'",
        ),
        (dict(kv_cache=True), ValueError, r"`kv_cache` must be None \(off\) or one of .* got True"),
        (
            dict(kv_cache="prefix", cache_refresh_every=0),
            ValueError,
            r"`cache_refresh_every` must be an integer >= 1, got 0",
        ),
        (
            dict(kv_cache="dual", cfg_scale=1.0),
            ValueError,
            r"`kv_cache` \('dual'\) does not combine with classifier-free",
        ),
    ],
)
def test_bad_call_arguments_raise_before_any_model_work(shipped, call, error, match):
    pipe, forwards = shipped
    before = forwards.calls
    with pytest.raises(error, match=match):
        pipe(**{**({} if "input_ids" in call else {"prompt": "1+2="}), **call})
    assert forwards.calls == before  # refused at the call's start: not one denoiser pass


def test_the_shipped_model_still_answers_at_the_edges_of_what_it_takes(shipped):
    pipe, _ = shipped
    assert pipe(prompt="123+4567=").texts == ["4690"]
    assert pipe(prompt=("123+4567=",)).texts == ["4690"]  # a tuple is a list of prompts
    longest = pipe(prompt="1" * 22)  # 22 prompt tokens + 18 answer tokens: all 40 positions
    assert longest.sequences.shape == (1, 18)
    ids = pipe.tokenizer(["58+9=", "123+4567="], return_tensors="pt", padding=True)
    out = pipe(input_ids=ids["input_ids"].int(), attention_mask=ids["attention_mask"].bool())  # any integer dtype
    assert out.texts == ["67", "4690"]
