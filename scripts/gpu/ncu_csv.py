"""ncu --csv output (one row per kernel and metric) as {launch id: {"name": kernel name, metric: value string}} in
launch order; for the scripts/gpu/*.sh profiles."""
import collections
import csv


def kernels(path):
    rows = [r for r in csv.reader(open(path)) if len(r) > 10]
    h = rows[0]
    ix = {k: h.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Value")}
    k = collections.OrderedDict()
    for r in rows[1:]:
        k.setdefault(int(r[ix["ID"]]), {"name": r[ix["Kernel Name"]]})[r[ix["Metric Name"]]] = r[ix["Metric Value"]].replace(",", "")
    return k
