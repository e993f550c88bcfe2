//! Rendering (n2g-method.md section 7): DOT for Graphviz, and SVG drawn here with no Graphviz.
//!
//! The drawn graph is a DAG made from the trie: IGNORE nodes are dropped (a context node hangs
//! from its nearest non-IGNORE ancestor, and IGNOREs do not count towards depth), and nodes with
//! the same label at the same depth are merged (keeping the max value; END-bearing if any merged
//! node holds an END). Activating tokens (depth 0) are filled red by activation, context tokens
//! blue by importance, as the reference scales them: the colour starts at `value = threshold -
//! 0.2` (0.3 for activations, 0.55 for importances with the default thresholds 0.5 and 0.75) and
//! is full at 1. END-bearing nodes get a bold outline; an END below [`FIRING_THRESHOLD`] is not
//! drawn as one, and paths that cannot fire are not drawn at all. Edges run from a context token
//! towards the token it precedes; activating tokens sit rightmost (rankdir RL), as text reads.
//! Labels are made visible as in the report (see [`visible`]: '·' '⏎' '␍' '⇥', invisible and
//! unprintable characters as their codes) and everything is escaped for DOT / XML.

use crate::trie::{Label, NeuronGraph, FIRING_THRESHOLD, ROOT};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

const ACTIVATION_FLOOR: f32 = 0.3;
const IMPORTANCE_FLOOR: f32 = 0.55;

/// One drawn node: merged trie nodes with this label at this depth.
#[derive(Clone, Debug, PartialEq)]
pub struct DagNode {
    pub depth: usize,
    pub label: String,
    pub value: f32,
    pub end: bool,
}

/// The DAG: nodes sorted by (depth, label); edges `(context node, node it precedes)` as indices;
/// `hidden`: activating labels left out (see [`MAX_DRAWN_ACTIVATING`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Dag {
    pub nodes: Vec<DagNode>,
    pub edges: Vec<(usize, usize)>,
    pub hidden: usize,
}

/// At most this many activating labels are drawn, the highest activation first (ties by label),
/// with the context that hangs from them. A graph can fire on thousands of labels (e.g. a neuron
/// that fires on almost any first token of a text); a drawing of all of them reads as nothing.
/// The title says how many were left out.
pub const MAX_DRAWN_ACTIVATING: usize = 64;

/// A drawn node's identity: (depth, label).
type DagKey<'a> = (usize, &'a str);

pub fn dag(g: &NeuronGraph) -> Dag {
    let mut merged: BTreeMap<DagKey, (f32, bool)> = BTreeMap::new();
    let mut edges: BTreeSet<(DagKey, DagKey)> = BTreeSet::new();
    // (trie node, key of nearest drawn ancestor, depth this node would get if drawn)
    let fire = g.can_fire(); // paths that cannot fire are not drawn: they carry the graded level
    let mut stack: Vec<(u32, Option<DagKey>, usize)> = g.roots().iter().map(|&r| (r, None, 0)).collect();
    while let Some((id, above, depth)) = stack.pop() {
        if !fire[id as usize] {
            continue;
        }
        let n = g.node(id);
        let (here, next_depth) = match &n.label {
            Label::Ignore => (above, depth),
            Label::Token(s) => {
                let key = (depth, &**s);
                let e = merged.entry(key).or_insert((f32::NEG_INFINITY, false));
                e.0 = e.0.max(n.value);
                e.1 |= n.end.is_some_and(|v| v >= FIRING_THRESHOLD); // an END that cannot fire is not one drawn
                if let Some(a) = above {
                    edges.insert((key, a));
                }
                (Some(key), depth + 1)
            }
        };
        stack.extend(n.children.iter().map(|&c| (c, here, next_depth)));
    }
    debug_assert!(g.node(ROOT).label != Label::Ignore);
    let mut roots: Vec<(DagKey, f32)> = merged.iter().filter(|(k, _)| k.0 == 0).map(|(k, v)| (*k, v.0)).collect();
    let hidden = roots.len().saturating_sub(MAX_DRAWN_ACTIVATING);
    if hidden > 0 {
        // keep the highest activating labels and the context reachable from them
        roots.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut keep: BTreeSet<DagKey> = roots[..MAX_DRAWN_ACTIVATING].iter().map(|r| r.0).collect();
        let mut context_of: BTreeMap<DagKey, Vec<DagKey>> = BTreeMap::new();
        for &(ctx, parent) in &edges {
            context_of.entry(parent).or_default().push(ctx);
        }
        let mut frontier: Vec<DagKey> = keep.iter().copied().collect();
        while let Some(k) = frontier.pop() {
            for &ctx in context_of.get(&k).map(Vec::as_slice).unwrap_or(&[]) {
                if keep.insert(ctx) {
                    frontier.push(ctx);
                }
            }
        }
        merged.retain(|k, _| keep.contains(k));
        edges.retain(|(c, p)| keep.contains(c) && keep.contains(p));
    }
    let index: BTreeMap<DagKey, usize> = merged.keys().enumerate().map(|(i, k)| (*k, i)).collect();
    Dag {
        nodes: merged.iter().map(|(&(depth, label), &(value, end))| DagNode { depth, label: label.to_owned(), value, end }).collect(),
        edges: edges.iter().map(|(a, b)| (index[a], index[b])).collect(),
        hidden,
    }
}

/// The label made visible, as the report's token display does it (one convention for the
/// project): space '·', newline '⏎', carriage return '␍', tab '⇥'; every other character of
/// Unicode category Cc, Cf, Cs, Co, Cn, Zl, Zp or Zs (controls, zero-width and direction marks,
/// BOM, non-characters, other spaces and separators) and the blank glyphs of [`BLANK_GLYPHS`] as
/// its code, `\xNN` below U+0100 and `U+XXXX` above; the empty label as '∅'.
pub fn visible(label: &str) -> String {
    if label.is_empty() {
        return "∅".to_owned();
    }
    let mut out = String::with_capacity(label.len());
    for c in label.chars() {
        match c {
            ' ' => out.push('·'),
            '\n' => out.push('⏎'),
            '\r' => out.push('␍'),
            '\t' => out.push('⇥'),
            c if invisible(c) => {
                let cp = c as u32;
                let _ = if cp < 0x100 { write!(out, "\\x{cp:02x}") } else { write!(out, "U+{cp:04X}") };
            }
            c => out.push(c),
        }
    }
    out
}

/// Letters and symbols that draw as blank space although their category says otherwise: the
/// combining grapheme joiner, the Hangul fillers and the blank Braille pattern.
const BLANK_GLYPHS: [char; 6] = ['\u{034F}', '\u{115F}', '\u{1160}', '\u{3164}', '\u{FFA0}', '\u{2800}'];

/// Whether `c` is shown as its code (see [`visible`]); the report asks this too, so the HTML and
/// the drawings agree on every character (one Unicode version: this crate's).
pub fn invisible(c: char) -> bool {
    use unicode_general_category::{get_general_category, GeneralCategory as C};
    BLANK_GLYPHS.contains(&c)
        || matches!(
            get_general_category(c),
            C::Control
                | C::Format
                | C::Surrogate
                | C::PrivateUse
                | C::Unassigned
                | C::LineSeparator
                | C::ParagraphSeparator
                | C::SpaceSeparator
        )
}

/// A DOT string's contents. Graphviz reads HTML entities in plain labels too ("&amp;" draws "&",
/// "&#x202e;" a raw RLO, "&#10;" a line break), so '&' is written as "&amp;" to draw as itself.
/// Control characters (possible in a model name: labels hold none after [`visible`]) become the
/// replacement character, as in the SVG: a NUL ended `dot`'s input in a syntax error.
fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '&' => out.push_str("&amp;"),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Not allowed in XML 1.0 at all (possible in a model or hook name): replacement char.
            c if ((c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r')) || matches!(c as u32, 0xFFFE | 0xFFFF) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// (fill, font colour) of a node.
fn colours(n: &DagNode) -> (String, &'static str) {
    let scale = |v: f32, floor: f32| (((v - floor) / (1.0 - floor)).clamp(0.0, 1.0) * 255.0) as u8;
    if n.depth == 0 {
        let s = 255 - scale(n.value, ACTIVATION_FLOOR);
        (format!("#ff{s:02x}{s:02x}"), "black")
    } else {
        let s = 255 - scale(n.value, IMPORTANCE_FLOOR);
        (format!("#{s:02x}{s:02x}ff"), if s < 130 { "white" } else { "black" })
    }
}

fn title(g: &NeuronGraph, d: &Dag) -> String {
    let t = format!("{} · layer {} · neuron {}", g.model, g.layer, g.neuron);
    if d.hidden == 0 {
        return t;
    }
    let drawn = d.nodes.iter().filter(|n| n.depth == 0).count();
    format!("{t} · {drawn} of {} activating tokens drawn (highest first)", drawn + d.hidden)
}

pub fn to_dot(g: &NeuronGraph) -> String {
    let d = dag(g);
    let max_depth = d.nodes.iter().map(|n| n.depth).max().unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"n2g_{}_{}\" {{", g.layer, g.neuron);
    let _ = writeln!(
        out,
        "  graph [rankdir=RL, splines=spline, ranksep=1.5, nodesep=0.2, labelloc=t, label=\"{}\"];",
        dot_escape(&title(g, &d))
    );
    out.push_str("  node [shape=box, style=\"filled,solid\", fontname=\"Helvetica\"];\n");
    out.push_str("  edge [penwidth=3, dir=back];\n");
    for depth in 0..=max_depth {
        // a cluster inherits the graph's label: without its own empty one, each column drew the title
        let _ = writeln!(out, "  subgraph cluster_{} {{\n    pencolor=white; penwidth=3; label=\"\";", max_depth - depth);
        for (i, n) in d.nodes.iter().enumerate().filter(|(_, n)| n.depth == depth) {
            let (fill, font) = colours(n);
            let shown = visible(&n.label);
            let _ = writeln!(
                out,
                "    n{i} [label=\"{}\", fillcolor=\"{fill}\", fontcolor={font}, fontsize={}, penwidth={}];",
                dot_escape(&shown),
                if shown.chars().count() < 12 { 25 } else { 18 },
                if n.end { 7 } else { 3 }
            );
        }
        out.push_str("  }\n");
    }
    // `parent -> context` with dir=back: the arrow is drawn from the context token towards the
    // token it precedes, and the activating token ranks rightmost under rankdir=RL.
    for &(ctx, parent) in &d.edges {
        let _ = writeln!(out, "  n{parent} -> n{ctx};");
    }
    out.push_str("}\n");
    out
}

const FONT_PX: f32 = 14.0;
const CHAR_PX: f32 = 8.6; // monospace advance at 14px, slightly generous
const NODE_H: f32 = 32.0;
const V_GAP: f32 = 14.0;
const H_GAP: f32 = 70.0;
const MARGIN: f32 = 20.0;
const TITLE_H: f32 = 30.0;
const MAX_CHARS: usize = 40;

/// SVG with a layered layout: one column per depth (activating tokens rightmost); see the
/// placement comment inside.
pub fn to_svg(g: &NeuronGraph) -> String {
    let d = dag(g);
    let max_depth = d.nodes.iter().map(|n| n.depth).max().unwrap_or(0);
    let shown: Vec<String> = d
        .nodes
        .iter()
        .map(|n| {
            let v = visible(&n.label);
            if v.chars().count() > MAX_CHARS {
                v.chars().take(MAX_CHARS - 1).chain(std::iter::once('…')).collect()
            } else {
                v
            }
        })
        .collect();
    let width_of = |i: usize| (shown[i].chars().count() as f32 * CHAR_PX + 20.0).max(40.0);
    let mut parents: Vec<Vec<usize>> = vec![Vec::new(); d.nodes.len()];
    for &(c, p) in &d.edges {
        parents[c].push(p);
    }
    // Columns top to bottom: activating tokens by label; each deeper node as close as it can
    // get to the mean height of the nodes it precedes (its parents), in that order, pushed down
    // just enough to keep a gap. Fewer crossings, short edges.
    let step = NODE_H + V_GAP;
    let mut y = vec![0.0f32; d.nodes.len()];
    let mut columns: Vec<Vec<usize>> = vec![Vec::new(); max_depth + 1];
    for (i, n) in d.nodes.iter().enumerate() {
        columns[n.depth].push(i); // (one pass: filtering all nodes per depth was quadratic on deep graphs)
    }
    for column in columns.iter_mut() {
        let mut col: Vec<(f32, usize)> = column
            .iter()
            .map(|&i| {
                let ps = &parents[i];
                let want = if ps.is_empty() { 0.0 } else { ps.iter().map(|&p| y[p]).sum::<f32>() / ps.len() as f32 };
                (want, i)
            })
            .collect();
        // Stable sort keeps label order (node indices are label-sorted) among equal targets.
        col.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut next = 0.0f32;
        for &(want, i) in &col {
            y[i] = want.max(next);
            next = y[i] + step;
        }
        *column = col.into_iter().map(|(_, i)| i).collect();
    }
    let col_w: Vec<f32> = columns.iter().map(|c| c.iter().map(|&i| width_of(i)).fold(40.0, f32::max)).collect();
    let body_h = y.iter().fold(0.0f32, |m, &v| m.max(v)) + NODE_H;
    // x of each column's left edge, deepest column leftmost.
    let mut col_x = vec![0.0f32; max_depth + 1];
    let mut x = MARGIN;
    for depth in (0..=max_depth).rev() {
        col_x[depth] = x;
        x += col_w[depth] + H_GAP;
    }
    let total_w = (x - H_GAP + MARGIN).max(title(g, &d).chars().count() as f32 * CHAR_PX + 2.0 * MARGIN);
    let total_h = MARGIN + TITLE_H + body_h + MARGIN;
    let pos = |i: usize| {
        let depth = d.nodes[i].depth;
        let w = width_of(i);
        (col_x[depth] + (col_w[depth] - w) / 2.0, MARGIN + TITLE_H + y[i], w)
    };

    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{total_w:.0}\" height=\"{total_h:.0}\" viewBox=\"0 0 {total_w:.0} {total_h:.0}\" \
         font-family=\"DejaVu Sans Mono, Menlo, Consolas, monospace\" font-size=\"{FONT_PX}\">"
    );
    let _ = writeln!(out, "<title>{}</title>", xml_escape(&title(g, &d)));
    out.push_str(
        "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\">\
         <path d=\"M0,0 L10,5 L0,10 z\" fill=\"#444\"/></marker></defs>\n",
    );
    let _ = writeln!(out, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        out,
        "<text x=\"{MARGIN}\" y=\"{:.1}\" font-size=\"16\" font-weight=\"bold\">{}</text>",
        MARGIN + 16.0,
        xml_escape(&title(g, &d))
    );
    out.push_str("<g class=\"edges\" fill=\"none\" stroke=\"#444\" stroke-width=\"2\">\n");
    for &(c, p) in &d.edges {
        let (cx, cy, cw) = pos(c);
        let (px, py, _) = pos(p);
        let (x1, y1, x2, y2) = (cx + cw, cy + NODE_H / 2.0, px, py + NODE_H / 2.0);
        let mid = (x1 + x2) / 2.0;
        let _ = writeln!(out, "<path d=\"M{x1:.1},{y1:.1} C{mid:.1},{y1:.1} {mid:.1},{y2:.1} {x2:.1},{y2:.1}\" marker-end=\"url(#arrow)\"/>");
    }
    out.push_str("</g>\n<g class=\"nodes\">\n");
    for column in &columns {
        for &i in column {
            let n = &d.nodes[i];
            let (x, y, w) = pos(i);
            let (fill, font) = colours(n);
            let role = if n.depth == 0 { "activation" } else { "importance" };
            let _ = writeln!(
                out,
                "<g class=\"node{}\"><title>{} (depth {}, {role} {:.3}{})</title>\
                 <rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{NODE_H}\" rx=\"4\" fill=\"{fill}\" stroke=\"black\" stroke-width=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{font}\">{}</text></g>",
                if n.end { " end" } else { "" },
                xml_escape(&visible(&n.label)),
                n.depth,
                n.value,
                if n.end { ", END" } else { "" },
                if n.end { 4 } else { 1 },
                x + w / 2.0,
                y + NODE_H / 2.0 + FONT_PX * 0.35,
                xml_escape(&shown[i])
            );
        }
    }
    out.push_str("</g>\n</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trie::tests::{ctx, graph, tok};

    fn sample() -> NeuronGraph {
        let mut g = graph();
        g.add_path(&tok(" <b>&\"", &[1], 0.9), &[ctx("x y", &[2], 0.9), None, ctx("\n", &[3], 0.8)], 0.9).unwrap();
        g.add_path(&tok("a", &[4], 0.6), &[ctx("x y", &[2], 0.9)], 0.6).unwrap();
        g.add_path(&tok("a", &[4], 0.6), &[None, ctx("\t", &[5], 0.8)], 0.5).unwrap();
        g.finalize().unwrap();
        g
    }

    #[test]
    fn dag_drops_ignore_and_merges_per_depth() {
        let d = dag(&sample());
        let names: Vec<(usize, &str, bool)> = d.nodes.iter().map(|n| (n.depth, n.label.as_str(), n.end)).collect();
        // "x y" at depth 1 under both roots is one node; IGNORE is gone, so "\n" and "\t"
        // sit at depth 1 and 2.
        assert_eq!(names, vec![(0, " <b>&\"", false), (0, "a", false), (1, "\t", true), (1, "x y", true), (2, "\n", true)]);
        assert_eq!(d.edges.len(), 4);
    }

    #[test]
    fn at_most_max_drawn_activating_labels_are_drawn_with_their_context() {
        // 100 labels that fire as the first token (BOS context), activations rising with i;
        // "t99" and "t0" also fire after "ctx"
        let n = MAX_DRAWN_ACTIVATING + 36;
        let mut g = graph();
        for i in 0..n as u32 {
            let v = 0.5 + 0.4 * i as f32 / n as f32;
            g.add_path(&tok(&format!("t{i:02}"), &[10 + i], v), &[ctx("<bos>", &[1], 1.0)], v).unwrap();
        }
        g.add_path(&tok("t99", &[109], 0.95), &[ctx("ctx", &[2], 0.9), ctx("far", &[3], 0.9)], 0.95).unwrap();
        g.add_path(&tok("t00", &[10], 0.5), &[ctx("ctx0", &[4], 0.9)], 0.5).unwrap();
        g.finalize().unwrap();
        let d = dag(&g);
        let roots: Vec<&str> = d.nodes.iter().filter(|x| x.depth == 0).map(|x| x.label.as_str()).collect();
        assert_eq!(roots.len(), MAX_DRAWN_ACTIVATING);
        assert_eq!(d.hidden, n - MAX_DRAWN_ACTIVATING);
        assert!(roots.contains(&"t99") && !roots.contains(&"t00")); // the highest first
        let ctx_labels: Vec<&str> = d.nodes.iter().filter(|x| x.depth > 0).map(|x| x.label.as_str()).collect();
        assert_eq!(ctx_labels, vec!["<bos>", "ctx", "far"]); // "ctx0" hangs from a label left out
        assert!(d.edges.iter().all(|&(c, p)| d.nodes[c].depth > d.nodes[p].depth));
        assert_eq!(d.edges.len(), MAX_DRAWN_ACTIVATING + 2);
        let title = format!("{MAX_DRAWN_ACTIVATING} of {n} activating tokens drawn");
        assert!(to_svg(&g).contains(&title) && to_dot(&g).contains(&title));
        assert!(!to_svg(&sample()).contains("activating tokens drawn"));
        assert_eq!(dag(&sample()).hidden, 0);
    }

    #[test]
    fn dot_and_svg_are_escaped_and_show_whitespace() {
        let g = sample();
        let dot = to_dot(&g);
        assert!(dot.contains("rankdir=RL"));
        assert!(dot.contains("label=\"·<b>&amp;\\\"\""), "{dot}"); // Graphviz decodes entities: '&' as one
        // every cluster clears the graph's label it inherits, so the title is drawn once
        assert_eq!(dot.matches("subgraph cluster_").count(), dot.matches("penwidth=3; label=\"\";").count());
        assert!(dot.contains("label=\"x·y\"") && dot.contains("label=\"⏎\"") && dot.contains("label=\"⇥\""));
        assert!(dot.contains("penwidth=7"));
        assert!(!dot.contains("IGNORE"));
        let svg = to_svg(&g);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("·&lt;b&gt;&amp;&quot;"));
        assert!(!svg.contains("<b>"));
        assert_eq!(svg.matches("<rect x=").count(), 5);
        assert_eq!(svg.matches("marker-end").count(), 4);
    }

    #[test]
    fn invisible_characters_become_codes() {
        assert_eq!(visible("a b\n\r\t"), "a·b⏎␍⇥");
        assert_eq!(visible("\u{200b}\u{a0}\u{202e}\u{feff}\u{85}\u{2028}\u{fffe}\u{ffff}\u{7f}\u{0}"), "U+200B\\xa0U+202EU+FEFF\\x85U+2028U+FFFEU+FFFF\\x7f\\x00");
        assert_eq!(visible("é日"), "é日");
        assert_eq!(visible(""), "∅");
        assert_eq!(visible("a\u{3164}\u{2800}\u{34f}"), "aU+3164U+2800U+034F"); // blank although letters
    }

    #[test]
    fn paths_that_cannot_fire_are_not_drawn() {
        let mut g = sample();
        g.add_path(&tok("z", &[9], 0.3), &[ctx("y", &[8], 0.9)], 0.3).unwrap(); // graded only
        g.add_path(&tok("a", &[4], 0.6), &[None, None, ctx("w", &[7], 0.9)], 0.1).unwrap();
        g.add_path(&tok("a", &[4], 0.2), &[], 0.2).unwrap(); // a graded END on a drawn node
        g.finalize().unwrap();
        assert_eq!(dag(&g), dag(&sample()));
    }

    #[test]
    fn dot_titles_hold_no_control_characters() {
        let mut g = graph();
        g.model = "a\0b\x1b[2J\n".to_owned();
        let dot = to_dot(&g);
        assert!(dot.contains("label=\"a\u{FFFD}b\u{FFFD}[2J\u{FFFD} · layer"), "{dot}");
        assert!(!dot.chars().any(|c| c.is_control() && c != '\n'));
    }

    #[test]
    fn empty_graph_renders() {
        let g = graph();
        assert!(to_dot(&g).contains("digraph"));
        assert!(to_svg(&g).contains("</svg>"));
    }
}
