import threading

import pytest
import torch
import tqdm

from tests.helpers import make_tokenizer, save_checkpoint, tiny_gpt2

torch.set_num_threads(1)  # tiny models: threads cost more than they give on 2 shared cores

# tqdm's default lock includes a multiprocessing semaphore, shared by every process forked after it exists. mutmut
# forks one process per mutant (two at a time with --jobs 2) and kills those that time out: one killed while
# holding it left every later one waiting at its first progress bar, forever. The tests need no lock across
# processes (the torchrun workers are separate interpreters).
tqdm.tqdm.set_lock(threading.RLock())


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer):
    """A 12-layer, 256-wide random GPT-2 with a tokenizer: big enough for every layer/subspace the spec uses."""
    hf = tiny_gpt2(tokenizer, n_embd=256, n_layer=12, n_head=16, n_inner=512)
    return save_checkpoint(hf, tokenizer, str(tmp_path_factory.mktemp("gpt2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
