"""A local web app to explore what a model predicts at every layer (``depthlens app``).

The page has five tabs:

- **Layers**: type or paste a text, pick a lens (or two lenses side by side), a statistic and how
  many top tokens the hover shows; the trajectory heatmap of :mod:`depthlens.viz.pictures` appears,
  and the figure (PNG, HTML) and the tidy table (CSV) can be downloaded.
- **Evaluation**: the per-layer curves and table that ``depthlens train``/``depthlens eval`` wrote
  next to a lens, when there are any.
- **Attribute lens**, **Logit attribution**, **Patchscopes**: the neighbouring readouts of
  :mod:`depthlens.apps.web_readouts`, sharing the model's lock with the Layers tab.

Limits: a text longer than ``max_tokens`` tokens is refused with a message naming the limit;
requests wait in a bounded queue (the model runs one request at a time, pictures are drawn two at
a time); the server binds to ``127.0.0.1`` unless told otherwise. Lenses are loaded once, when the
app is built: a request can only name one of them, never a path.

Gradio's telemetry is switched off (``GRADIO_ANALYTICS_ENABLED=False``), no share link is ever
made, and the page loads nothing from outside the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
from torch import nn
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.trajectory import STATISTICS, Trajectory
from depthlens.apps.evaluation_tab import evaluation_tab, read_evaluations
from depthlens.apps.web_readouts import readout_tabs
from depthlens.errors import AppError, DepthlensError
from depthlens.lenses import registry, spec
from depthlens.lenses.readout import Readout
from depthlens.text.encode import encode
from depthlens.text.samples import SAMPLE_PROMPT
from depthlens.training import runs
from depthlens.viz.pictures import heatmap_figure, save_figure, side_by_side

DEFAULT_HOST = "127.0.0.1"
"""The app listens on this machine only unless another host is given."""
DEFAULT_PORT = 7860
DEFAULT_MAX_TOKENS = 64
"""Longest text, in tokens, that the app decodes by default."""
MAX_K = 10
"""Most top tokens a request may ask the hover to show."""
QUEUE_SIZE = 64
"""Requests that may wait for their turn; more are told the queue is full."""
CHARS_PER_TOKEN = 64
"""A text longer than ``max_tokens × CHARS_PER_TOKEN`` characters is refused before tokenizing."""
FILE_LIFETIME_S = 3600
"""Downloads, and the data of a page's last picture, are kept this long (seconds)."""

EXAMPLE_NOTE = "**Example** — computed for the sample text when the page opened, before you typed anything. Type your own text and press Show."
"""What the message says above the picture the page opens with."""

_ANALYTICS = "GRADIO_ANALYTICS_ENABLED"
_DOWNLOADS = {"png": "PNG figure", "html": "HTML figure (interactive)", "csv": "CSV table"}
_CSS = "#heatmap { overflow-x: auto !important; }"


class Explorer:
    """What the app computes for a request, without the page: the trajectories of one model under
    the lenses it was given.

    ``views`` maps what the lens chooser offers to the lenses it shows: each lens alone, and the
    first lens beside each other one (``"logit vs tuned"``). The model runs under a lock, one
    request at a time, since capturing its states hooks its blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        lenses: Mapping[str, Readout],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        if not lenses:
            raise AppError("give the app at least one lens")
        if max_tokens < 1:
            raise AppError(f"the longest text must be at least 1 token, got {max_tokens}")
        limit = getattr(model.config, "max_position_embeddings", None)
        self.model = model
        self.tokenizer = tokenizer
        self.lenses = dict(lenses)
        self.max_tokens = min(max_tokens, limit) if isinstance(limit, int) else max_tokens
        names = list(self.lenses)
        self.views: dict[str, tuple[str, ...]] = {name: (name,) for name in names}
        self.views.update({f"{names[0]} vs {other}": (names[0], other) for other in names[1:]})
        self.lock = threading.Lock()

    @property
    def default_view(self) -> str:
        """The view the page opens with: the second lens (the first one given besides the logit lens) if there is one."""
        names = list(self.lenses)
        return names[1] if len(names) > 1 else names[0]

    def trajectories(self, text: str, view: str, k: int = 5) -> list[Trajectory]:
        """The trajectory of each lens of ``view`` on ``text``, keeping the top ``k`` tokens.

        Raises :class:`AppError` for a view the app does not offer, a ``k`` outside ``1 …``
        :data:`MAX_K`, and a text that is empty or longer than ``max_tokens`` tokens.
        """
        if view not in self.views:
            raise AppError(f"unknown lens {view!r}: this app offers {', '.join(map(repr, self.views))}")
        if not 1 <= k <= MAX_K:
            raise AppError(f"top-k must be between 1 and {MAX_K}, got {k}")
        if len(text) > self.max_tokens * CHARS_PER_TOKEN:
            raise self._too_long(f"{len(text):,} characters")
        with self.lock:
            try:
                input_ids, _ = encode(self.tokenizer, text)
            except DepthlensError as error:
                raise AppError(str(error)) from None
            if input_ids.shape[1] > self.max_tokens:
                raise self._too_long(f"{input_ids.shape[1]} tokens")
            return [
                Trajectory.from_ids(self.model, self.lenses[name], input_ids, tokenizer=self.tokenizer, k=k, lens_name=name)
                for name in self.views[view]
            ]

    def _too_long(self, size: str) -> AppError:
        return AppError(f"The text is too long: {size}, and this app reads at most {self.max_tokens} tokens. Shorten it and press Show again.")


def figure(trajectories: Sequence[Trajectory], stat: str) -> go.Figure:
    """The interactive heatmap of one trajectory, or two side by side with their difference."""
    if stat not in STATISTICS:
        raise AppError(f"unknown statistic {stat!r}: choose one of {', '.join(STATISTICS)}")
    if len(trajectories) == 1:
        return heatmap_figure(trajectories[0], stat)
    return side_by_side(*trajectories, stat)


def write_downloads(trajectories: Sequence[Trajectory], stat: str, directory: str | os.PathLike) -> dict[str, Path]:
    """Write the picture as PNG and HTML (plotly.js inside, so it opens offline) and the table as
    CSV into ``directory``; returns the paths by suffix."""
    names = "-".join(t.lens_name for t in trajectories)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"depthlens-{names}-{stat}")
    return {
        suffix: save_figure(list(trajectories), Path(directory) / f"{stem}.{suffix}", stat=stat, plotlyjs="inline")
        for suffix in _DOWNLOADS
    }


class _Files:
    """Per-request folders for downloads under one temporary folder, removed after
    :data:`FILE_LIFETIME_S` and when the app is garbage-collected or the process exits."""

    def __init__(self) -> None:
        self._root = tempfile.TemporaryDirectory(prefix="depthlens-app-")
        self.root = Path(self._root.name)

    def new_folder(self) -> Path:
        """A fresh folder for one request's files, after removing expired ones."""
        expired = time.time() - FILE_LIFETIME_S
        for folder in self.root.glob("request-*"):
            if folder.stat().st_mtime < expired:
                shutil.rmtree(folder, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix="request-", dir=self.root))


def build_app(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lenses: Mapping[str, Readout],
    eval_dirs: Mapping[str, Path] | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    queue_size: int = QUEUE_SIZE,
    example: str = SAMPLE_PROMPT,
) -> gr.Blocks:
    """The Gradio app for ``model`` and the named ``lenses`` (e.g. ``{"logit": LogitLens(model)}``).

    ``eval_dirs`` maps lens names to the folders where their evaluation was written (``eval.json``,
    ``curves.png``, …); they are read now, once. ``example`` is the text the page opens with; its
    picture is computed when the page loads and labelled as an example (:data:`EXAMPLE_NOTE`). Launch the
    result with :func:`start`, which also lets wide heatmaps scroll sideways (Gradio's own ``launch``
    works too); requests queue, at most ``queue_size`` of them.
    """
    os.environ[_ANALYTICS] = "False"
    explorer = Explorer(model, tokenizer, lenses, max_tokens=max_tokens)
    files = _Files()
    evaluations = read_evaluations(eval_dirs or {}, files.root)
    first = next(iter(explorer.lenses.values()))
    with gr.Blocks(title=f"depthlens · {first.parts.model_name}", fill_width=True, analytics_enabled=False,
                   delete_cache=(FILE_LIFETIME_S, FILE_LIFETIME_S)) as demo:
        gr.Markdown(
            f"## depthlens · {first.parts.model_name}\nWhat the model predicts at every one of its "
            f"{first.num_layers} layers. Rows are layers (0 = the embeddings, output = the model), columns "
            "the input tokens; each cell shows the token predicted next, coloured by the chosen statistic."
        )
        with gr.Tab("Layers", elem_id="layers-tab"):
            _layers_tab(demo, explorer, files, example)
        with gr.Tab("Evaluation", elem_id="evaluation-tab"):
            evaluation_tab(evaluations)
        readout_tabs(model, tokenizer, explorer.lenses, max_tokens=explorer.max_tokens, lock=explorer.lock)
    demo.queue(default_concurrency_limit=2, max_size=queue_size)
    return demo


def _layers_tab(demo: gr.Blocks, explorer: Explorer, files: _Files, example: str) -> None:
    """The text box, the lens, statistic and top-k choosers, the heatmap and its downloads; the
    page shows ``example`` when it loads."""
    with gr.Row():
        text_box = gr.Textbox(value=example, lines=4, elem_id="text", scale=3,
                              label=f"text (at most {explorer.max_tokens} tokens; a sample to start with — replace it)")
        with gr.Column(scale=2):
            view_box = gr.Dropdown(list(explorer.views), value=explorer.default_view, label="lens", elem_id="lens")
            stat_box = gr.Dropdown([(s.title, s.name) for s in STATISTICS.values()], value="entropy",
                                   label="statistic", elem_id="stat")
            k_box = gr.Slider(1, MAX_K, value=5, step=1, label="top-k on hover", elem_id="top-k")
            run = gr.Button("Show", variant="primary", elem_id="show")
    message = gr.Markdown(elem_id="message")
    plot = gr.Plot(label="trajectory", elem_id="heatmap")
    with gr.Row():
        downloads = [gr.DownloadButton(label, visible=False, elem_id=f"download-{suffix}")
                     for suffix, label in _DOWNLOADS.items()]
    shown = gr.State(time_to_live=FILE_LIFETIME_S)
    inputs, outputs = [text_box, view_box, stat_box, k_box], [message, plot, shown, *downloads]
    show, prepare_downloads = _show_handler(explorer), _downloads_handler(files)
    for trigger in (run.click(show, inputs, outputs, api_name="show"),
                    demo.load(_as_example(show), inputs, outputs, api_visibility="private")):
        trigger.then(prepare_downloads, shown, downloads, api_visibility="private")


def _as_example(show: Callable[..., tuple]) -> Callable[..., tuple]:
    """The handler of the page's first load: :func:`_show_handler`'s, with its message marked as
    an example computed before the user did anything."""
    def show_example(*inputs: object) -> tuple:
        message, *rest = show(*inputs)
        return (f"{EXAMPLE_NOTE}\n\n{message}", *rest)

    return show_example


def _hidden_downloads() -> list[gr.DownloadButton]:
    return [gr.DownloadButton(value=None, visible=False) for _ in _DOWNLOADS]


def _show_handler(explorer: Explorer) -> Callable[[str, str, str, float], tuple]:
    """The Show button's handler: the message, the figure, what was shown (for the downloads)
    and the download buttons, hidden until the files are written."""
    def show(text: str, view: str, stat: str, k: float) -> tuple:
        try:
            trajectories = explorer.trajectories(text, view, int(k))
            picture = figure(trajectories, stat)
        except AppError as error:
            return (f"**{error}**", None, None, *_hidden_downloads())
        tokens = int(trajectories[0].attention_mask.sum())
        message = (f"{tokens} tokens × {len(trajectories[0].layers)} rows (layer 0 = embeddings, output = the model). "
                   f"Each cell shows the top-1 next token; hover for the top {int(k)}.")
        return (message, picture, (trajectories, stat), *_hidden_downloads())

    return show


def _downloads_handler(files: _Files) -> Callable[[tuple[list[Trajectory], str] | None], list[gr.DownloadButton]]:
    """Writes the files of what was shown into a fresh folder and shows their buttons."""
    def prepare_downloads(shown: tuple[list[Trajectory], str] | None) -> list[gr.DownloadButton]:
        if shown is None:
            return _hidden_downloads()
        paths = write_downloads(*shown, files.new_folder())
        return [gr.DownloadButton(value=str(paths[suffix]), visible=True) for suffix in _DOWNLOADS]

    return prepare_downloads


def load_lenses(model: nn.Module, lens_dirs: Sequence[str | os.PathLike] = ()) -> tuple[dict[str, Readout], dict[str, Path]]:
    """The readouts the app offers (:func:`depthlens.lenses.spec.load_lenses`: the logit lens and
    the readout of each spec, by name) and the evaluation folders found next to them
    (:func:`depthlens.training.runs.find_evaluations`).

    Raises :class:`~depthlens.errors.LensFileError` for a spec that names no readout for this model.
    """
    lenses, sources = spec.load_lenses(model, lens_dirs)
    return lenses, runs.find_evaluations(sources)


def start(demo: gr.Blocks, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, quiet: bool = False) -> str:
    """Start serving ``demo`` on ``host:port`` in the background, without telemetry, a share link
    or server-side rendering; returns the local URL. Stop it with ``demo.close()``."""
    os.environ[_ANALYTICS] = "False"
    try:
        _, url, _ = demo.launch(
            server_name=host, server_port=port, share=False, ssr_mode=False, mcp_server=False, pwa=False,
            inbrowser=False, prevent_thread_lock=True, quiet=quiet, css=_CSS,
        )
    except OSError as error:
        raise AppError(f"cannot listen on {host}:{port} ({error.strerror or 'the port is taken'}): pass another --port") from None
    return url


def serve(
    model_spec: str,
    lens_dirs: Sequence[str | os.PathLike] | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> None:
    """Load ``model_spec`` and its lenses, and serve the app on ``host:port`` until interrupted.

    Without ``lens_dirs`` the app offers the logit lens and, if the main training job has written
    one, the tuned lens in ``runs/<model>/lens``.
    """
    from depthlens.model.load import load_model

    if not 1 <= port <= 65535:
        raise AppError(f"the port must be between 1 and 65535, got {port}; pass another --port")
    if lens_dirs is None:
        trained = runs.trained_lens(model_spec)
        lens_dirs = [trained] if trained else []
    for lens_spec in lens_dirs:
        registry.check_spec(lens_spec)
    model, tokenizer = load_model(model_spec)
    lenses, eval_dirs = load_lenses(model, lens_dirs)
    demo = build_app(model, tokenizer, lenses, eval_dirs, max_tokens=max_tokens)
    url = start(demo, host, port, quiet=True)
    print(f"depthlens app: open {url} (Ctrl+C stops it)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"depthlens app: listening on {host}: anyone who can reach this address can use the app", flush=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.block_thread()
    finally:
        demo.close()


def _interrupt(signum: int, frame: object) -> None:
    """Stop on SIGTERM as on Ctrl+C, so the server closes and its temporary files are removed."""
    raise KeyboardInterrupt


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_PORT",
    "EXAMPLE_NOTE",
    "MAX_K",
    "AppError",
    "Explorer",
    "build_app",
    "figure",
    "load_lenses",
    "serve",
    "start",
    "write_downloads",
]
