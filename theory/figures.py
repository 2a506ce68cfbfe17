"""Where the notebooks' plots go: out/notebooks/<name>.png (git-ignored), shown only off Agg."""
import os

import matplotlib
import matplotlib.pyplot as plt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_figure(fig, name):
    folder = os.path.join(ROOT, "out", "notebooks")
    os.makedirs(folder, exist_ok=True)
    fig.savefig(os.path.join(folder, name + ".png"), dpi=120)
    if matplotlib.get_backend().lower() != "agg":
        plt.show()
