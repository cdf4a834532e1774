# Recall with relation ids resolved strictly (as the evaluator) and leniently
# (an undefined id resolved to any predicted object of its category), over a
# predictions_<stage>_<split>.jsonl written by `r1_sgg eval`.
import json, re, sys
def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0])); iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    ua = (a[2]-a[0])*(a[3]-a[1]) + (b[2]-b[0])*(b[3]-b[1]) - inter
    return inter / ua if ua > 0 else 0
def cat(i): return i.rsplit('.', 1)[0]
def parse(t):
    m = re.search(r'<answer>(.*)</answer>', t, re.S)
    try: return json.loads(m.group(1))
    except Exception: return None
stats = dict(strict=0., lenient=0., n=0, rels=0, invalid_rels=0, fixable=0, pred_rels=0)
for l in open(sys.argv[1]):
    r = json.loads(l); p = parse(r['prediction']); g = json.loads(r['ground_truth'])
    if not g['relationships']: continue
    stats['n'] += 1
    gobj = {o['id']: o['bbox'] for o in g['objects']}
    if p is None: continue
    pobj = {o['id']: o['bbox'] for o in p.get('objects', []) if isinstance(o, dict) and 'id' in o}
    bycat = {}
    for i in pobj: bycat.setdefault(cat(i), []).append(i)
    def resolve(i, lenient):
        if i in pobj: return [i]
        return bycat.get(cat(i), []) if lenient else []
    for mode in ('strict', 'lenient'):
        hit = 0
        for gr in g['relationships']:
            ok = False
            for pr in p.get('relationships', []):
                if pr.get('predicate') != gr['predicate']: continue
                for s in resolve(pr.get('subject', ''), mode == 'lenient'):
                    for o in resolve(pr.get('object', ''), mode == 'lenient'):
                        if cat(s) == cat(gr['subject']) and cat(o) == cat(gr['object']) and iou(pobj[s], gobj[gr['subject']]) >= .5 and iou(pobj[o], gobj[gr['object']]) >= .5: ok = True
            hit += ok
        stats[mode] += hit / len(g['relationships'])
    for pr in p.get('relationships', []):
        stats['pred_rels'] += 1
        bad = pr.get('subject') not in pobj or pr.get('object') not in pobj
        stats['invalid_rels'] += bad
        stats['fixable'] += bad and len(resolve(pr.get('subject', ''), True)) > 0 and len(resolve(pr.get('object', ''), True)) > 0
n = stats['n']
print(f"{sys.argv[1]}: images {n}, strict R {100*stats['strict']/n:.1f}%, lenient (ids resolved by category) R {100*stats['lenient']/n:.1f}%, relations/img {stats['pred_rels']/n:.2f}, invalid rels {100*stats['invalid_rels']/max(1,stats['pred_rels']):.0f}%, of which category exists {100*stats['fixable']/max(1,stats['invalid_rels']):.0f}%")
