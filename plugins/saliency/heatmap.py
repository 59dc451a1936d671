"""The score heatmap of one prompt as a static PNG, labelled like the HTML view (inseq-style axes).

Rows are the prompt's tokens, columns the response's tokens, cells the integer scores ``S`` (0..10, b = 0).
Both axes carry the tokens; instruction tokens are shaded (a band across the row and a highlighted label);
a sequence longer than the limit keeps its first and last tokens with one grey marker row (or column) between
them saying how many were left out (:func:`kept`, the same rule as the HTML canvas).
"""
from __future__ import annotations

import textwrap
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

MAX_ROWS = 60   # prompt tokens labelled in a PNG (first and last halves, a marker between)
MAX_COLS = 60   # response tokens
CANVAS_ROWS = 120  # the HTML canvas labels more (it scrolls)
CANVAS_COLS = 100
INSTRUCTION = "#facc15"
TRUNCATED = "#d9d9d9"


def kept(n: int, limit: int) -> list[int]:
    """Indices shown of a length-``n`` axis: all, or the first and last ``limit // 2`` with ``-1`` (the
    truncation marker) between them."""
    if n <= limit:
        return list(range(n))
    head = limit // 2
    return list(range(head)) + [-1] + list(range(n - (limit - head), n))


def token_label(token: str, width: int = 14) -> str:
    """A token as a tick label: newlines and tabs visible, blanks as ␣, long tokens cut with an ellipsis."""
    text = token.replace("\n", "↵").replace("\t", "⇥")
    if not text.strip():
        text = "␣" * max(1, min(len(text), 3))
    return text if len(text) <= width else text[:width - 1] + "…"


def _labels(tokens: Sequence[str], index: list[int], what: str) -> list[str]:
    hidden = len(tokens) - (len(index) - 1)
    return [f"⋯ {hidden} more {what} ⋯" if i < 0 else token_label(tokens[i]) for i in index]


def heatmap_png(path: str | Path, scores: np.ndarray, prompt_tokens: Sequence[str], response_tokens: Sequence[str],
                instruction: np.ndarray, title: str) -> Path:
    """Write the heatmap of ``scores`` ``[N, M]`` (rows: ``prompt_tokens``, columns: ``response_tokens``;
    ``instruction`` ``[N]`` bool marks the instruction's tokens) to ``path``."""
    from matplotlib.patches import Patch

    from tuneshift.plugins.saliency.views import _pyplot, _save

    plt = _pyplot()
    n, m = scores.shape
    rows, cols = kept(n, MAX_ROWS), kept(m, MAX_COLS)
    r, c = np.array(rows), np.array(cols)
    grid = np.asarray(scores, dtype=float)[np.ix_(r.clip(0), c.clip(0))]   # [len(rows), len(cols)]
    grid[r < 0, :] = np.nan
    grid[:, c < 0] = np.nan
    cmap = plt.get_cmap("Reds").with_extremes(bad=TRUNCATED)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.8 + 0.17 * len(cols)), max(4.0, 2.4 + 0.17 * len(rows))))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=10, aspect="auto",
                      interpolation="nearest")
    with warnings.catch_warnings():  # tokens in scripts the font lacks still get a tick (as a box)
        warnings.simplefilter("ignore")
        ax.set_yticks(range(len(rows)), _labels(prompt_tokens, rows, "prompt tokens"), fontsize=7)
        ax.set_xticks(range(len(cols)), _labels(response_tokens, cols, "response tokens"), fontsize=7, rotation=90)
    instr = np.array([i >= 0 and bool(instruction[i]) for i in rows])
    for y, (label, flag) in enumerate(zip(ax.get_yticklabels(), instr)):
        if flag:
            label.set_bbox({"facecolor": INSTRUCTION, "alpha": 0.6, "edgecolor": "none", "pad": 0.5})
            ax.axhspan(y - 0.5, y + 0.5, color=INSTRUCTION, alpha=0.22, lw=0, zorder=2)
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("response tokens (generated, left to right)")
    ax.set_ylabel("prompt tokens (top to bottom)")
    ax.set_title(textwrap.fill(title, int(fig.get_figwidth() * 11)), fontsize=9, pad=12)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("score S (0-10, per response token)")
    handles = [Patch(facecolor=INSTRUCTION, alpha=0.6, label="instruction tokens")]
    if -1 in rows or -1 in cols:
        handles.append(Patch(facecolor=TRUNCATED, label="tokens left out (⋯)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.02), fontsize=7, frameon=False,
              ncol=len(handles))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _save(plt, fig, path)


# The HTML view's canvas: the same axes, shading and truncation as the PNG, drawn from a compact payload
# (``data-heat``: n, m, cells as one character per score, rows, cols, instr, max_rows, max_cols).
CANVAS_SCRIPT = r"""
document.querySelectorAll('.heat').forEach(function(box){
  var d=JSON.parse(box.dataset.heat), c=box.querySelector('canvas'), tip=box.querySelector('.tip');
  function kept(n,limit){var out=[],i;if(n<=limit){for(i=0;i<n;i++)out.push(i);return out;}
    var head=Math.floor(limit/2);for(i=0;i<head;i++)out.push(i);out.push(-1);
    for(i=n-(limit-head);i<n;i++)out.push(i);return out;}
  function label(t){t=t.replace(/\n/g,'\u21b5').replace(/\t/g,'\u21e5');
    if(!t.trim())t='\u2423';return t.length>14?t.slice(0,13)+'\u2026':t;}
  var rows=kept(d.n,d.max_rows), cols=kept(d.m,d.max_cols);
  var rowText=rows.map(function(i){return i<0?'\u22ef '+(d.n-rows.length+1)+' more \u22ef':label(d.rows[i]);});
  var colText=cols.map(function(j){return j<0?'\u22ef '+(d.m-cols.length+1)+' more \u22ef':label(d.cols[j]);});
  var s=Math.max(10,Math.min(14,Math.floor(1100/Math.max(cols.length,1))));
  var font=Math.min(11,s)+'px ui-monospace,monospace';
  var g=c.getContext('2d');g.font=font;
  function widest(a){return a.reduce(function(w,t){return Math.max(w,g.measureText(t).width);},0);}
  var left=Math.ceil(widest(rowText))+30, top=Math.ceil(widest(colText))+30;
  c.width=left+cols.length*s+8;c.height=top+rows.length*s+8;g=c.getContext('2d');g.font=font;
  g.fillStyle='#fff';g.fillRect(0,0,c.width,c.height);g.fillStyle='#333';
  g.fillText('response tokens \u2192',left,12);
  g.save();g.translate(12,top);g.rotate(Math.PI/2);g.fillText('prompt tokens \u2192',0,0);g.restore();
  rows.forEach(function(i,y){var py=top+y*s;
    if(i>=0&&d.instr[i]){g.fillStyle='rgba(250,204,21,0.6)';g.fillRect(left-widest([rowText[y]])-8,py,
      widest([rowText[y]])+6,s);g.fillStyle='rgba(250,204,21,0.22)';g.fillRect(left,py,cols.length*s,s);}
    g.fillStyle='#333';g.textAlign='right';g.fillText(rowText[y],left-4,py+s-2);g.textAlign='left';
    cols.forEach(function(j,x){var px=left+x*s;
      if(i<0||j<0){g.fillStyle='#d9d9d9';g.fillRect(px,py,s,s);return;}
      var v=parseInt(d.cells[i*d.m+j],11);if(v>0){g.fillStyle='rgba(214,39,40,'+(v/10)+')';g.fillRect(px,py,s,s);}});
  });
  cols.forEach(function(j,x){g.save();g.translate(left+x*s+s-3,top-4);g.rotate(-Math.PI/2);g.fillStyle='#333';
    g.fillText(colText[x],0,0);g.restore();});
  g.strokeStyle='#bbb';g.strokeRect(left,top,cols.length*s,rows.length*s);
  c.addEventListener('mousemove',function(e){var r=c.getBoundingClientRect(),
    x=Math.floor((e.clientX-r.left-left)/s), y=Math.floor((e.clientY-r.top-top)/s);
    if(y<0||x<0||y>=rows.length||x>=cols.length||rows[y]<0||cols[x]<0){tip.style.display='none';return;}
    var i=rows[y], j=cols[x];
    tip.textContent=JSON.stringify(d.rows[i])+' -> '+JSON.stringify(d.cols[j])+': '+parseInt(d.cells[i*d.m+j],11)+
      (d.instr[i]?' (instruction)':'');
    tip.style.left=(e.clientX+12)+'px';tip.style.top=(e.clientY+12)+'px';tip.style.display='block';});
  c.addEventListener('mouseleave',function(){tip.style.display='none';});
});
"""


__all__ = ["CANVAS_SCRIPT", "MAX_COLS", "MAX_ROWS", "heatmap_png", "kept", "token_label"]
