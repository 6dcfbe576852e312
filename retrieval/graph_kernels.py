"""Compiled (numba, nogil) kernels of the attention-aware graph index.

The graph is one int32 adjacency matrix `adj` [capacity, wp + ws] with two degree
arrays: columns [0, pdeg[u]) hold u's *projection* edges (built from query -> key
relations), columns [wp, wp + sdeg[u]) its *supplementary* edges (added to keep the
graph connected and to link incrementally inserted keys). `indeg` counts in-edges and
`parent` holds a spanning tree from the entry points whose edges are never removed, so
incremental inserts cannot make old keys unreachable.
Scores are inner products, higher is better.

Every kernel releases the GIL, so indexes build and search in parallel Python threads.
Node ids are cast to int64 and `keys` / query vectors are passed read-only so that each
kernel compiles once (numba specialises on every distinct argument type).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True)
_NO_BUDGET = 1 << 62


@njit(fastmath=True, **_JIT)
def _dot(keys, i, q):
    s = np.float32(0.0)
    for d in range(q.shape[0]):
        s += keys[i, d] * q[d]
    return s


@njit(**_JIT)
def _sift_down(vals, idx, root, end):
    while True:
        child = 2 * root + 1
        if child >= end:
            return
        if child + 1 < end and vals[idx[child + 1]] < vals[idx[child]]:
            child += 1
        if vals[idx[child]] < vals[idx[root]]:
            idx[root], idx[child] = idx[child], idx[root]
            root = child
        else:
            return


@njit(**_JIT)
def argsort_desc(vals):
    """Indices that sort `vals` descending (heapsort: numba's np.argsort is slow to compile)."""
    n = vals.shape[0]
    idx = np.arange(n)
    for root in range(n // 2 - 1, -1, -1):
        _sift_down(vals, idx, root, n)
    for end in range(n - 1, 0, -1):
        idx[0], idx[end] = idx[end], idx[0]
        _sift_down(vals, idx, np.int64(0), end)
    return idx


@njit(**_JIT)
def _contains(arr, n, v):
    for i in range(n):
        if arr[i] == v:
            return True
    return False


@njit(**_JIT)
def _neighbour(adj, pdeg, wp, u, j):
    """The j-th out-neighbour of u: projection edges first, then supplementary ones."""
    n_p = pdeg[u]
    return np.int64(adj[u, j] if j < n_p else adj[u, wp + j - n_p])


@njit(**_JIT)
def _has_edge(adj, pdeg, sdeg, wp, u, v):
    for j in range(pdeg[u] + sdeg[u]):
        if _neighbour(adj, pdeg, wp, u, j) == v:
            return True
    return False


@njit(**_JIT)
def _pool_insert(pid, psc, pexp, size, cap, node, score):
    """Insert into the pool sorted by descending score; returns (position, new size)."""
    lo, hi = 0, size
    while lo < hi:
        mid = (lo + hi) // 2
        if psc[mid] >= score:
            lo = mid + 1
        else:
            hi = mid
    if lo >= cap:
        return cap, size
    last = size if size < cap else cap - 1
    for j in range(last, lo, -1):
        pid[j] = pid[j - 1]
        psc[j] = psc[j - 1]
        pexp[j] = pexp[j - 1]
    pid[lo] = node
    psc[lo] = score
    pexp[lo] = False
    return lo, min(size + 1, cap)


@njit(**_JIT)
def _seed(q, keys, seeds, n_seeds, ef, visited, stamp, pid, psc, pexp, size, scanned):
    """Score seeds[:n_seeds] not yet visited into the pool; returns (size, scanned)."""
    for t in range(n_seeds):
        e = seeds[t]
        if visited[e] == stamp:
            continue
        visited[e] = stamp
        scanned += 1
        _, size = _pool_insert(pid, psc, pexp, size, ef, e, _dot(keys, e, q))
    return size, scanned


@njit(**_JIT)
def _expand(q, keys, adj, pdeg, sdeg, wp, ef, budget, visited, stamp, pid, psc, pexp, size,
            scanned):  # fmt: skip
    """Best-first expansion of the pool until every pooled node is expanded or `budget`
    scores have been computed; returns (pool size, scanned)."""
    i = 0
    while i < size and scanned < budget:
        if pexp[i]:
            i += 1
            continue
        pexp[i] = True
        u = pid[i]
        first_new = ef
        for j in range(pdeg[u] + sdeg[u]):
            v = _neighbour(adj, pdeg, wp, u, j)
            if visited[v] == stamp:
                continue
            visited[v] = stamp
            s = _dot(keys, v, q)
            scanned += 1
            if size < ef or s > psc[ef - 1]:
                pos, size = _pool_insert(pid, psc, pexp, size, ef, v, s)
                first_new = min(first_new, pos)
            if scanned >= budget:
                break
        i = first_new if first_new <= i else i + 1
    return size, scanned


@njit(**_JIT)
def beam_search(q, keys, adj, pdeg, sdeg, wp, entries, ef, visited, stamp, pid, psc, pexp):
    """Best-first search keeping the `ef` best nodes seen; returns (pool size, scanned).

    `visited[v] == stamp` marks nodes already scored for this query.
    """
    size, scanned = _seed(
        q, keys, entries, entries.shape[0], ef, visited, stamp, pid, psc, pexp, 0, 0
    )
    return _expand(
        q, keys, adj, pdeg, sdeg, wp, ef, _NO_BUDGET, visited, stamp, pid, psc, pexp, size,
        scanned,
    )  # fmt: skip


@njit(**_JIT)
def batch_search(queries, keys, adj, pdeg, sdeg, wp, entries, centroids, lists, list_len, ef,
                 budget, k, seeds):  # fmt: skip
    """Routed, budgeted beam search for each query; returns ids [B, k] (-1 padded),
    scores, scanned [B].

    The query's given seeds[b] (ids up to the first -1, at most budget // 2 of them) are
    scored first, e.g. its previous decode step's result. With routes (centroids [C, D]
    non-empty), a query scores the C centroids, takes the best one's key list
    lists[c, :list_len[c]] (what is left of budget // 2) as seeds besides the entries,
    then expands best-first. At most `budget` vectors are scored
    per query, centroids included (every one counts in `scanned`).
    """
    batch = queries.shape[0]
    ids = np.full((batch, k), -1, dtype=np.int64)
    scores = np.full((batch, k), -np.inf, dtype=np.float32)
    scanned = np.zeros(batch, dtype=np.int64)
    visited = np.zeros(keys.shape[0], dtype=np.int64)
    pid = np.empty(ef, dtype=np.int64)
    psc = np.empty(ef, dtype=np.float32)
    pexp = np.empty(ef, dtype=np.bool_)
    n_routes = centroids.shape[0]
    for b in range(batch):
        q = queries[b]
        size, cnt = np.int64(0), np.int64(0)
        n_given = 0
        while n_given < seeds.shape[1] and seeds[b, n_given] >= 0:
            n_given += 1
        size, cnt = _seed(q, keys, seeds[b], min(n_given, budget // 2), ef, visited, b + 1, pid,
                          psc, pexp, size, cnt)  # fmt: skip
        if n_routes > 0:
            best, best_s = 0, -np.inf
            for c in range(n_routes):
                s = _dot(centroids, c, q)
                if s > best_s:
                    best, best_s = c, s
            cnt = n_routes
            n_seeds = min(list_len[best], max(budget // 2 - cnt, 0))
            size, cnt = _seed(q, keys, lists[best], n_seeds, ef, visited, b + 1, pid, psc, pexp,
                              size, cnt)  # fmt: skip
        size, cnt = _seed(q, keys, entries, entries.shape[0], ef, visited, b + 1, pid, psc, pexp,
                          size, cnt)  # fmt: skip
        size, cnt = _expand(
            q, keys, adj, pdeg, sdeg, wp, ef, budget, visited, b + 1, pid, psc, pexp, size, cnt
        )
        for i in range(min(k, size)):
            ids[b, i] = pid[i]
            scores[b, i] = psc[i]
        scanned[b] = cnt
    return ids, scores, scanned


@njit(**_JIT)
def prune(keys, tgt, cands, count, max_degree, out, start):
    """Write up to `max_degree` neighbours of `tgt`, chosen from distinct cands[:count],
    into out[start:]; returns how many.

    RoarGraph's rule for inner product: take candidates by descending <c, tgt>, skip c
    when an already chosen s has <s, c> > <tgt, c> (c is better reached through s), then
    fill the remaining slots with the skipped ones in the same order.
    """
    sims = np.empty(count, dtype=np.float32)
    key_tgt = keys[tgt]
    for i in range(count):
        sims[i] = _dot(keys, cands[i], key_tgt)
    order = argsort_desc(sims)
    taken = np.zeros(count, dtype=np.bool_)
    n = 0
    for oi in range(count):
        if n >= max_degree:
            break
        i = order[oi]
        key_c = keys[cands[i]]
        occluded = False
        for t in range(start, start + n):
            if _dot(keys, out[t], key_c) > sims[i]:
                occluded = True
                break
        if not occluded:
            out[start + n] = cands[i]
            n += 1
            taken[i] = True
    for oi in range(count):
        if n >= max_degree:
            break
        i = order[oi]
        if not taken[i]:
            out[start + n] = cands[i]
            n += 1
    return n


@njit(**_JIT)
def project(keys, nn, order, adj, pdeg, wp):
    """Projection of the query -> key bipartite graph onto keys.

    nn [M, kq]: each sample query's top keys, best first; `order` sorts the queries by
    best key. Each best key gets edges to the other top keys of every query it tops,
    pooled and pruned to `wp`.
    """
    nq, kq = nn.shape
    mark = np.full(keys.shape[0], -1, dtype=np.int64)
    buf = np.empty(min(keys.shape[0], nq * kq), dtype=np.int64)
    out = np.empty(wp, dtype=np.int64)
    i = 0
    while i < nq:
        tgt = nn[order[i], 0]
        j = i
        c = np.int64(0)
        while j < nq and nn[order[j], 0] == tgt:
            row = order[j]
            for r in range(1, kq):
                v = nn[row, r]
                if v != tgt and mark[v] != tgt:
                    mark[v] = tgt
                    buf[c] = v
                    c += 1
            j += 1
        cnt = prune(keys, tgt, buf, c, wp, out, np.int64(0))
        for t in range(cnt):
            adj[tgt, t] = out[t]
        pdeg[tgt] = cnt
        i = j


@njit(**_JIT)
def add_reverse_projection(keys, adj, pdeg, wp, n):
    """Make projection edges two-way: v's list becomes prune(out(v) + in(v)) if too long."""
    offsets = np.zeros(n + 1, dtype=np.int64)
    for u in range(n):
        for j in range(pdeg[u]):
            offsets[adj[u, j] + 1] += 1
    max_in = 0
    for v in range(n):
        max_in = max(max_in, offsets[v + 1])
        offsets[v + 1] += offsets[v]
    rev = np.empty(offsets[n], dtype=np.int64)
    fill = offsets.copy()
    for u in range(n):
        for j in range(pdeg[u]):
            v = adj[u, j]
            rev[fill[v]] = u
            fill[v] += 1
    mark = np.full(n, -1, dtype=np.int64)
    buf = np.empty(wp + max_in, dtype=np.int64)
    out = np.empty(wp, dtype=np.int64)
    for v in range(n):
        mark[v] = v
        c = np.int64(0)
        for j in range(pdeg[v]):
            u = np.int64(adj[v, j])
            mark[u] = v
            buf[c] = u
            c += 1
        for t in range(offsets[v], offsets[v + 1]):
            u = rev[t]
            if mark[u] != v:
                mark[u] = v
                buf[c] = u
                c += 1
        if c > wp:
            c = prune(keys, v, buf, c, wp, out, np.int64(0))
            for t in range(c):
                buf[t] = out[t]
        for t in range(c):
            adj[v, t] = buf[t]
        pdeg[v] = c


@njit(**_JIT)
def in_degrees(adj, pdeg, sdeg, wp, n):
    """In-degree of each node (array as long as adj)."""
    indeg = np.zeros(adj.shape[0], dtype=np.int32)
    for u in range(n):
        for j in range(pdeg[u] + sdeg[u]):
            indeg[_neighbour(adj, pdeg, wp, u, j)] += 1
    return indeg


@njit(**_JIT)
def _protected(indeg, parent, y, z):
    """Whether edge y -> z must stay: z's only in-edge, or z's spanning-tree edge."""
    return indeg[z] <= 1 or parent[z] == y


@njit(**_JIT)
def _set_edges(keys, adj, deg, col, width, other_deg, other_col, indeg, parent, y, cands, count,
               old, work, out):  # fmt: skip
    """Replace one of y's edge lists (columns [col, col + width), length deg[y]) by a
    pruned choice from distinct cands[:count], skipping targets already in y's other
    list. Protected old edges are kept. Keeps `indeg` up to date.
    """
    m = np.int64(deg[y])
    n_keep = np.int64(0)
    for j in range(m):
        old[j] = adj[y, col + j]
        if _protected(indeg, parent, y, old[j]):
            out[n_keep] = old[j]
            n_keep += 1
    c = np.int64(0)
    for i in range(count):
        v = cands[i]
        if v == y or _contains(out, n_keep, v) or _contains(adj[y, other_col:], other_deg[y], v):
            continue
        work[c] = v
        c += 1
    cnt = n_keep + prune(keys, y, work, c, width - n_keep, out, n_keep)
    for j in range(m):
        if not _contains(out, cnt, old[j]):
            indeg[old[j]] -= 1
    for j in range(cnt):
        if not _contains(old, m, out[j]):
            indeg[out[j]] += 1
        adj[y, col + j] = out[j]
    deg[y] = cnt


@njit(**_JIT)
def _set_supply(keys, adj, pdeg, sdeg, indeg, parent, wp, ws, y, cands, count, old, work, out):
    _set_edges(keys, adj, sdeg, wp, ws, pdeg, 0, indeg, parent, y, cands, count, old, work, out)


@njit(**_JIT)
def project_online(keys, nn, adj, pdeg, sdeg, indeg, parent, wp):
    """Projection step for queries seen after the build: nn [B, kq] holds each query's
    (searched) top keys, best first, -1 padded. The best key's projection list is
    re-pruned with the others added, and each gets the reverse edge where it has room.
    """
    nq, kq = nn.shape
    cand = np.empty(wp + kq, dtype=np.int64)
    work = np.empty(wp + kq, dtype=np.int64)
    old = np.empty(wp, dtype=np.int64)
    out = np.empty(wp, dtype=np.int64)
    for r in range(nq):
        tgt = nn[r, 0]
        if tgt < 0:
            continue
        m = np.int64(pdeg[tgt])
        for j in range(m):
            cand[j] = adj[tgt, j]
        c = m
        for i in range(1, kq):
            v = nn[r, i]
            if v >= 0 and not _contains(cand, m, v):
                cand[c] = v
                c += 1
        _set_edges(keys, adj, pdeg, 0, wp, sdeg, wp, indeg, parent, tgt, cand, c, old, work, out)
        for j in range(pdeg[tgt]):
            v = np.int64(adj[tgt, j])
            if pdeg[v] < wp and not _has_edge(adj, pdeg, sdeg, wp, v, tgt):
                adj[v, pdeg[v]] = tgt
                pdeg[v] += 1
                indeg[tgt] += 1


@njit(**_JIT)
def _force_link(adj, pdeg, sdeg, indeg, parent, wp, ws, y, x):
    """Add edge y -> x; when y is full, replace the unprotected supplementary edge whose
    target has the most in-edges. Returns False when every edge of y is protected."""
    if _has_edge(adj, pdeg, sdeg, wp, y, x):
        return True
    m = sdeg[y]
    if m < ws:
        adj[y, wp + m] = x
        sdeg[y] = m + 1
        indeg[x] += 1
        return True
    best, best_in = -1, 0
    for j in range(m):
        z = np.int64(adj[y, wp + j])
        if not _protected(indeg, parent, y, z) and indeg[z] > best_in:
            best, best_in = j, indeg[z]
    if best < 0:
        return False
    indeg[adj[y, wp + best]] -= 1
    adj[y, wp + best] = x
    indeg[x] += 1
    return True


@njit(**_JIT)
def _replace_weakest(keys, adj, sdeg, indeg, parent, wp, y, x):
    """In y's full supplementary list, replace the unprotected target least similar to y
    by x when x is more similar."""
    key_y = keys[y]
    worst, worst_sim = -1, _dot(keys, x, key_y)
    for j in range(sdeg[y]):
        z = np.int64(adj[y, wp + j])
        if not _protected(indeg, parent, y, z):
            s = _dot(keys, z, key_y)
            if s < worst_sim:
                worst, worst_sim = j, s
    if worst >= 0:
        indeg[adj[y, wp + worst]] -= 1
        adj[y, wp + worst] = x
        indeg[x] += 1


@njit(**_JIT)
def insert_nodes(
    keys, guides, adj, pdeg, sdeg, indeg, parent, wp, ws, entries, ef, start, end, orphans
):
    """Link nodes [start, end) into the graph one by one (supplementary edges).

    Each node searches the current graph with its own key as the query (RoarGraph's
    connectivity enhancement), keeps a pruned set of the results (with its existing
    supplementary edges) as out-edges, and adds the reverse edges (replacing a full
    neighbour's weakest unprotected edge). A node left with no in-edge is force-linked
    from one of the nodes its search found.

    With `parent` tracking on (parent[start] == -1 and the graph already has a spanning
    tree, i.e. after the build), each node records the neighbour that links to it as
    its tree parent; tree edges are never removed, so every key stays reachable. Nodes
    that could not be linked are written to `orphans`; returns their count.
    """
    n = keys.shape[0]
    visited = np.zeros(n, dtype=np.int64)
    pid = np.empty(ef, dtype=np.int64)
    psc = np.empty(ef, dtype=np.float32)
    pexp = np.empty(ef, dtype=np.bool_)
    cand = np.empty(ef + ws + 1, dtype=np.int64)
    work = np.empty(ef + ws + 1, dtype=np.int64)
    old = np.empty(ws, dtype=np.int64)
    out = np.empty(ws, dtype=np.int64)
    n_orphans = 0
    track = orphans.shape[0] > 0
    for x in range(start, end):
        size, _ = beam_search(
            guides[x - start],
            keys,
            adj,
            pdeg,
            sdeg,
            wp,
            entries,
            ef,
            visited,
            x - start + 1,
            pid,
            psc,
            pexp,
        )
        m = np.int64(sdeg[x])
        for j in range(m):
            cand[j] = adj[x, wp + j]
        c = m
        for i in range(size):
            if pid[i] != x and not _contains(cand, m, pid[i]):
                cand[c] = pid[i]
                c += 1
        _set_supply(keys, adj, pdeg, sdeg, indeg, parent, wp, ws, x, cand, c, old, work, out)
        for t in range(sdeg[x]):
            y = np.int64(adj[x, wp + t])
            if _has_edge(adj, pdeg, sdeg, wp, y, x):
                continue
            m = np.int64(sdeg[y])
            if m < ws:
                adj[y, wp + m] = x
                sdeg[y] = m + 1
                indeg[x] += 1
            else:
                _replace_weakest(keys, adj, sdeg, indeg, parent, wp, y, x)
        if _contains(entries, entries.shape[0], x):
            continue
        if track:
            for t in range(sdeg[x]):
                y = np.int64(adj[x, wp + t])
                if _has_edge(adj, pdeg, sdeg, wp, y, x):
                    parent[x] = y
                    break
        if indeg[x] == 0 or (track and parent[x] < 0):
            for i in range(size):
                y = pid[i]
                if y != x and _force_link(adj, pdeg, sdeg, indeg, parent, wp, ws, y, x):
                    if track:
                        parent[x] = y
                    break
        if track and parent[x] < 0:
            orphans[n_orphans] = x
            n_orphans += 1
    return n_orphans


@njit(**_JIT)
def _flood(adj, pdeg, sdeg, wp, seeds, seen, queue, parent):
    """Mark in `seen` everything reachable from `seeds` (seen nodes are not re-entered),
    recording in `parent` the node each one was first reached from."""
    head, tail = 0, 0
    for s in seeds:
        if not seen[s]:
            seen[s] = True
            queue[tail] = s
            tail += 1
    while head < tail:
        u = queue[head]
        head += 1
        for j in range(pdeg[u] + sdeg[u]):
            v = _neighbour(adj, pdeg, wp, u, j)
            if not seen[v]:
                seen[v] = True
                parent[v] = u
                queue[tail] = v
                tail += 1


@njit(**_JIT)
def spanning_tree(adj, pdeg, sdeg, wp, entries, n):
    """BFS tree from the entry points: (reachable [n] bool, parent [n], -1 at roots)."""
    seen = np.zeros(n, dtype=np.bool_)
    parent = np.full(n, -1, dtype=np.int64)
    _flood(adj, pdeg, sdeg, wp, entries, seen, np.empty(n, dtype=np.int64), parent)
    return seen, parent


@njit(**_JIT)
def repair_reachability(keys, adj, pdeg, sdeg, indeg, wp, ws, entries, ef, max_rounds):
    """Force-link each key unreachable from the entries from a reachable key that a
    search for it finds. Returns how many are still unreachable after max_rounds."""
    n = keys.shape[0]
    visited = np.zeros(n, dtype=np.int64)
    queue = np.empty(n, dtype=np.int64)
    no_tree = np.full(n, -1, dtype=np.int64)  # no spanning tree yet: in-degree rule only
    scratch = np.empty(n, dtype=np.int64)
    pid = np.empty(ef, dtype=np.int64)
    psc = np.empty(ef, dtype=np.float32)
    pexp = np.empty(ef, dtype=np.bool_)
    one = np.empty(1, dtype=np.int64)
    stamp = 0
    for rnd in range(max_rounds + 1):
        seen = np.zeros(n, dtype=np.bool_)
        _flood(adj, pdeg, sdeg, wp, entries, seen, queue, scratch)
        missing = n - seen.sum()
        if missing == 0 or rnd == max_rounds:
            return missing
        for x in range(n):
            if seen[x]:
                continue
            stamp += 1
            size, _ = beam_search(
                keys[x], keys, adj, pdeg, sdeg, wp, entries, ef, visited, stamp, pid, psc, pexp
            )
            for i in range(size):
                y = pid[i]
                if y != x and _force_link(adj, pdeg, sdeg, indeg, no_tree, wp, ws, y, x):
                    one[0] = x
                    _flood(adj, pdeg, sdeg, wp, one, seen, queue, scratch)
                    break
    return n
