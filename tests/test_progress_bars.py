"""--no-progress (train(progress=False)) silences every progress bar, the libraries' own included."""

from tests.test_train_support import classification_setup


def test_progress_bars_off_in_the_block_and_back_after(capsys):
    from tqdm.auto import tqdm

    from lorafit.train.models import progress_bars

    with progress_bars(False):
        for _ in tqdm(range(3), desc="inside"):
            pass
        for _ in tqdm(range(3), desc="asked for", disable=False):  # a library that passes disable=False
            pass
    for _ in tqdm(range(3), desc="after"):
        pass
    err = capsys.readouterr().err
    assert "inside" not in err and "asked for" not in err
    assert "after" in err


def test_a_run_without_progress_prints_no_bar(tmp_path, capfd, monkeypatch):
    """A library's own bar while the model loads (as transformers' GGUF conversion draws one) stays off."""
    from tqdm.auto import tqdm

    from lorafit.cli import main
    from lorafit.train import run

    def load_model_with_a_bar(*args, **kwargs):
        for _ in tqdm(range(3), desc="Converting tensors"):
            pass
        return real_load_model(*args, **kwargs)

    real_load_model = run.load_model
    monkeypatch.setattr(run, "load_model", load_model_with_a_bar)
    config = classification_setup(tmp_path)
    capfd.readouterr()  # the set-up's own save_pretrained bars
    assert main(["train", str(config), "--no-progress", "--set", "train.max_steps=2"]) == 0
    out = capfd.readouterr()
    assert "Converting tensors" not in out.err + out.out, out.err[-2000:]
    assert "it/s" not in out.err + out.out, out.err[-2000:]
