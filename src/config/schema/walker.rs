//! A small walker over toml's span-carrying tree that collects every error.
//!
//! A [`Table`] is one TOML table and an [`Item`] one value, each with its dotted key path
//! (`listen[1].address`). Their readers check a type or a value; when it is wrong they record
//! an error at the value's line and column in the [`Walker`] and return `None`, so a caller
//! reads every key of a section, then gives up on the section only if a required one failed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::{Range, RangeInclusive};
use std::path::Path;
use std::time::Duration;

use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;

use crate::config::ConfigError;

/// One walk over a document: the text (for positions), the directory relative paths resolve
/// against, the errors found so far, and the span of every value visited, by key path, so that
/// problems found later (by `validate`) can be placed too.
pub(super) struct Walker<'a> {
    text: &'a str,
    pub dir: &'a Path,
    errors: RefCell<Vec<ConfigError>>,
    spans: RefCell<HashMap<String, Range<usize>>>,
}

impl<'a> Walker<'a> {
    pub fn new(text: &'a str, dir: &'a Path) -> Self {
        let (errors, spans) = Default::default();
        Walker { text, dir, errors, spans }
    }

    /// The value `v` found at key path `path`.
    pub fn item(&'a self, path: String, v: &'a Spanned<DeValue<'a>>) -> Item<'a> {
        self.spans.borrow_mut().insert(path.clone(), v.span());
        Item { w: self, path, v }
    }

    pub fn error(&self, key: &str, span: Range<usize>, message: String) {
        let (line, column) = line_column(self.text, span.start);
        let key = key.to_owned();
        self.errors.borrow_mut().push(ConfigError { key, line, column, message });
    }

    /// An error at the value visited under `key`, or with line 0 if none was.
    pub fn error_at_key(&self, key: &str, message: String) {
        let span = self.spans.borrow().get(key).cloned();
        match span {
            Some(span) => self.error(key, span, message),
            None => {
                let key = key.to_owned();
                let e = ConfigError { key, line: 0, column: 0, message };
                self.errors.borrow_mut().push(e);
            }
        }
    }

    /// Every error, in file order; those without a position last.
    pub fn into_errors(self) -> Vec<ConfigError> {
        let mut errors = self.errors.into_inner();
        errors.sort_by_key(|e| (e.line == 0, e.line, e.column));
        errors
    }
}

/// 1-based line and column (counted in characters) of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (before.matches('\n').count() + 1, column)
}

/// One TOML table: its key path, its span (the `[header]`, or the `{ ... }`) and its entries.
#[derive(Clone)]
pub(super) struct Table<'a> {
    pub w: &'a Walker<'a>,
    pub path: String,
    pub span: Range<usize>,
    pub map: &'a DeTable<'a>,
}

impl<'a> Table<'a> {
    fn key_path(&self, key: &str) -> String {
        match self.path.as_str() {
            "" => key.to_owned(),
            path => format!("{path}.{key}"),
        }
    }

    pub fn opt(&self, key: &str) -> Option<Item<'a>> {
        let v = self.map.get(key)?;
        Some(self.w.item(self.key_path(key), v))
    }

    /// The value at `key` read by `read`; `None` if it is missing or wrong.
    pub fn get<T>(&self, key: &str, read: impl FnOnce(&Item<'a>) -> Option<T>) -> Option<T> {
        read(&self.opt(key)?)
    }

    /// [`Table::get`], or `default` if the value is missing or wrong.
    pub fn get_or<T>(&self, key: &str, read: impl FnOnce(&Item<'a>) -> Option<T>, default: T) -> T {
        self.get(key, read).unwrap_or(default)
    }

    /// [`Table::get`], and an error at the table's position if `key` is missing.
    pub fn require<T>(&self, key: &str, read: impl FnOnce(&Item<'a>) -> Option<T>) -> Option<T> {
        if !self.map.contains_key(key) {
            let message = format!("missing required key {key:?}");
            self.w.error(&self.key_path(key), self.span.clone(), message);
        }
        self.get(key, read)
    }

    /// Every key (spanned, for errors about the key itself) with its value.
    pub fn entries(&self) -> impl Iterator<Item = (&'a Spanned<DeString<'a>>, Item<'a>)> + '_ {
        let path = |k: &Spanned<DeString>| self.key_path(k.get_ref());
        self.map.iter().map(move |(k, v)| (k, self.w.item(path(k), v)))
    }

    fn deny_unknown(&self, keys: &[&str]) {
        for key in self.map.keys() {
            let name: &str = key.get_ref();
            if !keys.contains(&name) {
                let expected = keys.join(", ");
                let message = format!("unknown key {name:?} (expected one of: {expected})");
                self.w.error(&self.key_path(name), key.span(), message);
            }
        }
    }

    /// An array of tables (`[[key]]` or `key = [{ ... }]`) with only `keys`, each read by
    /// `read`: the elements read without error, each with its key path (`listen[2]`).
    pub fn tables<T>(
        &self,
        key: &str,
        keys: &[&str],
        read: impl Fn(&Table<'a>) -> Option<T>,
    ) -> Vec<(String, T)> {
        let items = self.get(key, Item::array).unwrap_or_default();
        let read_one = |i: &Item<'a>| Some((i.path.clone(), read(&i.table(keys)?)?));
        items.iter().filter_map(read_one).collect()
    }
}

/// One value: its key path (`listen[1].address`) and the spanned value.
pub(super) struct Item<'a> {
    pub w: &'a Walker<'a>,
    pub path: String,
    v: &'a Spanned<DeValue<'a>>,
}

impl<'a> Item<'a> {
    pub fn value(&self) -> &'a DeValue<'a> {
        self.v.get_ref()
    }

    pub fn error(&self, message: String) {
        self.w.error(&self.path, self.v.span(), message);
    }

    /// [`Item::error`], returning `None` so that readers can `return v.fail(...)`.
    pub fn fail<T>(&self, message: String) -> Option<T> {
        self.error(message);
        None
    }

    /// Fails with "expected `what`, found ...": a string found is quoted, anything else named.
    pub fn expected<T>(&self, what: &str) -> Option<T> {
        let found = match self.value() {
            DeValue::String(s) => format!("{:?}", s.as_ref()),
            other => type_name(other).to_owned(),
        };
        self.fail(format!("expected {what}, found {found}"))
    }

    /// A string; none may hold a NUL byte, since each ends up in a C string (an argv element,
    /// an environment variable, a path, a name).
    pub fn str(&self) -> Option<&'a str> {
        match self.value() {
            DeValue::String(s) if s.contains('\0') => self.fail(format!(
                "{:?} holds a NUL byte, which no argument, environment variable or path may hold",
                s.as_ref()
            )),
            DeValue::String(s) => Some(s),
            _ => self.expected("a string"),
        }
    }

    pub fn string(&self) -> Option<String> {
        self.str().map(str::to_owned)
    }

    pub fn int(&self, range: RangeInclusive<u64>) -> Option<u64> {
        let DeValue::Integer(i) = self.value() else {
            return self.expected("an integer");
        };
        let n = i64::from_str_radix(i.as_str(), i.radix()).ok();
        let (min, max) = (range.start(), range.end());
        match n.and_then(|n| u64::try_from(n).ok()) {
            Some(n) if range.contains(&n) => Some(n),
            _ if *max >= u64::from(u32::MAX) => {
                self.fail(format!("expected an integer >= {min}, found {i}"))
            }
            _ => self.fail(format!("expected an integer from {min} to {max}, found {i}")),
        }
    }

    pub fn u32(&self, range: RangeInclusive<u32>) -> Option<u32> {
        let n = self.int(u64::from(*range.start())..=u64::from(*range.end()))?;
        u32::try_from(n).ok()
    }

    pub fn bool(&self) -> Option<bool> {
        match self.value() {
            DeValue::Boolean(b) => Some(*b),
            _ => self.expected("true or false"),
        }
    }

    /// One of a few strings.
    pub fn one_of(&self, choices: &[&'static str]) -> Option<&'static str> {
        let s = self.value().as_str();
        if let Some(&choice) = choices.iter().find(|&&c| Some(c) == s) {
            return Some(choice);
        }
        let quoted: Vec<String> = choices.iter().map(|c| format!("{c:?}")).collect();
        self.expected(&format!("one of {}", quoted.join(", ")))
    }

    pub fn duration(&self) -> Option<Duration> {
        let DeValue::String(s) = self.value() else {
            return self.expected("a duration like \"5s\"");
        };
        let invalid = |e| self.error(format!("invalid duration {:?}: {e}", s.as_ref()));
        humantime::parse_duration(s).map_err(invalid).ok()
    }

    pub fn nonzero_duration(&self) -> Option<Duration> {
        match self.duration()? {
            d if d.is_zero() => self.fail("must be greater than zero".to_owned()),
            d => Some(d),
        }
    }

    /// The elements, with key paths `path[i]`.
    pub fn array(&self) -> Option<Vec<Item<'a>>> {
        let DeValue::Array(a) = self.value() else {
            return self.expected("an array");
        };
        let item = |(i, v)| self.w.item(format!("{}[{i}]", self.path), v);
        Some(a.iter().enumerate().map(item).collect())
    }

    /// A table with only `keys` (others are reported).
    pub fn table(&self, keys: &[&str]) -> Option<Table<'a>> {
        let t = self.map()?;
        t.deny_unknown(keys);
        Some(t)
    }

    /// A table with any keys.
    pub fn map(&self) -> Option<Table<'a>> {
        let DeValue::Table(map) = self.value() else {
            return self.expected("a table");
        };
        let (w, path, span) = (self.w, self.path.clone(), self.v.span());
        Some(Table { w, path, span, map })
    }
}

fn type_name(v: &DeValue) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Every element, or `None` if any is `None`: all are read first, so all errors are reported.
pub(super) fn all<T>(items: impl Iterator<Item = Option<T>>) -> Option<Vec<T>> {
    let items: Vec<Option<T>> = items.collect();
    items.into_iter().collect()
}
