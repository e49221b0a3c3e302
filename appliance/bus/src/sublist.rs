//! Subscriptions by pattern, as a tree of subject tokens: finding who
//! matches a subject walks the subject's tokens (and the `*` and `>`
//! branches beside them), so its cost grows with the subject's length and
//! the number of matches, not with the number of subscriptions.
//!
//! Before this, every subject not in the bus's match cache scanned and
//! sorted all subscriptions under the index's write lock; with 20,000
//! subscriptions one such publish took 21 ms (release build), and clients
//! that subscribe and unsubscribe often (a fresh inbox per request) cleared
//! the cache each time.

use std::collections::HashMap;

/// Subscription ids by pattern.
#[derive(Debug, Default)]
pub(crate) struct Sublist {
    root: Node,
    len: usize,
}

#[derive(Debug, Default)]
struct Node {
    /// Literal next tokens.
    literal: HashMap<Box<str>, Node>,
    /// The `*` branch: any one token.
    star: Option<Box<Node>>,
    /// Patterns that end at this node.
    here: Vec<u64>,
    /// Patterns that end with `>` after this node's tokens: one or more
    /// tokens more.
    rest: Vec<u64>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.star.is_none()
            && self.here.is_empty()
            && self.rest.is_empty()
    }
}

impl Sublist {
    /// Adds subscription `id` with a valid `pattern`.
    pub fn insert(&mut self, pattern: &str, id: u64) {
        let mut node = &mut self.root;
        let mut tokens = pattern.split('.').peekable();
        while let Some(tok) = tokens.next() {
            if tok == ">" && tokens.peek().is_none() {
                node.rest.push(id);
                self.len += 1;
                return;
            }
            node = if tok == "*" {
                node.star.get_or_insert_with(Box::default)
            } else {
                node.literal.entry(tok.into()).or_default()
            };
        }
        node.here.push(id);
        self.len += 1;
    }

    /// Removes subscription `id` added with `pattern`; whether it was there.
    /// Branches left empty are removed.
    pub fn remove(&mut self, pattern: &str, id: u64) -> bool {
        let tokens: Vec<&str> = pattern.split('.').collect();
        let removed = remove_at(&mut self.root, &tokens, id);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Appends the ids of every subscription whose pattern matches the
    /// (valid, literal) `subject`, in no particular order.
    pub fn matches(&self, subject: &str, out: &mut Vec<u64>) {
        let tokens: Vec<&str> = subject.split('.').collect();
        collect(&self.root, &tokens, out);
    }

    /// How many subscriptions it holds.
    pub fn len(&self) -> usize {
        self.len
    }
}

fn collect(node: &Node, tokens: &[&str], out: &mut Vec<u64>) {
    let Some((first, more)) = tokens.split_first() else {
        out.extend_from_slice(&node.here);
        return;
    };
    out.extend_from_slice(&node.rest);
    if let Some(next) = node.literal.get(*first) {
        collect(next, more, out);
    }
    if let Some(next) = &node.star {
        collect(next, more, out);
    }
}

fn remove_at(node: &mut Node, tokens: &[&str], id: u64) -> bool {
    let take = |ids: &mut Vec<u64>| match ids.iter().position(|&x| x == id) {
        Some(i) => {
            ids.swap_remove(i);
            true
        }
        None => false,
    };
    match tokens.split_first() {
        None => take(&mut node.here),
        Some((&">", [])) => take(&mut node.rest),
        Some((&"*", more)) => {
            let Some(next) = node.star.as_mut() else {
                return false;
            };
            let removed = remove_at(next, more, id);
            if next.is_empty() {
                node.star = None;
            }
            removed
        }
        Some((tok, more)) => {
            let Some(next) = node.literal.get_mut(*tok) else {
                return false;
            };
            let removed = remove_at(next, more, id);
            if next.is_empty() {
                node.literal.remove(*tok);
            }
            removed
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::subject::matches;
    use proptest::prelude::*;

    fn ids(list: &Sublist, subject: &str) -> Vec<u64> {
        let mut v = Vec::new();
        list.matches(subject, &mut v);
        v.sort_unstable();
        v
    }

    #[test]
    fn wildcards_as_in_nats() {
        let mut l = Sublist::default();
        for (id, p) in ["a.b", "a.*", "a.>", ">", "*.b", "a", "a.b.>", "*"]
            .iter()
            .enumerate()
        {
            l.insert(p, id as u64);
        }
        assert_eq!(ids(&l, "a.b"), vec![0, 1, 2, 3, 4]);
        assert_eq!(ids(&l, "a"), vec![3, 5, 7]);
        assert_eq!(ids(&l, "a.b.c"), vec![2, 3, 6]);
        assert_eq!(ids(&l, "x.b"), vec![3, 4]);
        assert_eq!(l.len(), 8);
        assert!(l.remove("a.*", 1));
        assert!(!l.remove("a.*", 1), "already gone");
        assert!(!l.remove("a.b", 1), "not under that pattern");
        assert_eq!(ids(&l, "a.b"), vec![0, 2, 3, 4]);
        for (id, p) in [
            (0, "a.b"),
            (2, "a.>"),
            (3, ">"),
            (4, "*.b"),
            (5, "a"),
            (6, "a.b.>"),
            (7, "*"),
        ] {
            assert!(l.remove(p, id));
        }
        assert_eq!(l.len(), 0);
        assert!(l.root.is_empty(), "empty branches are pruned: {:?}", l.root);
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), "[a-c]{1,2}"]
    }

    fn pattern() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![3 => token(), 1 => Just("*".to_string())], 1..5),
            any::<bool>(),
        )
            .prop_map(|(mut toks, gt)| {
                if gt {
                    *toks.last_mut().unwrap() = ">".into();
                }
                toks.join(".")
            })
    }

    fn subject() -> impl Strategy<Value = String> {
        prop::collection::vec(token(), 1..6).prop_map(|t| t.join("."))
    }

    proptest! {
        /// Same answers as matching every pattern in turn, after inserts
        /// and removals in any order.
        #[test]
        fn agrees_with_matching_each_pattern(
            patterns in prop::collection::vec(pattern(), 1..40),
            removed in prop::collection::vec(any::<bool>(), 40),
            subjects in prop::collection::vec(subject(), 1..20),
        ) {
            let mut l = Sublist::default();
            for (id, p) in patterns.iter().enumerate() {
                l.insert(p, id as u64);
            }
            let mut live = Vec::new();
            for (id, p) in patterns.iter().enumerate() {
                if removed[id] {
                    prop_assert!(l.remove(p, id as u64));
                } else {
                    live.push((id as u64, p));
                }
            }
            prop_assert_eq!(l.len(), live.len());
            for s in &subjects {
                let want: Vec<u64> =
                    live.iter().filter(|(_, p)| matches(p, s)).map(|(id, _)| *id).collect();
                prop_assert_eq!(ids(&l, s), want, "subject {}", s);
            }
        }
    }
}
