//! The CSV of a CSV-sourced BulkUserChange: reading it (any bytes in, an error or rows out, never
//! a panic), mapping its header to user fields, and checking each row on its own before the PBX
//! is asked anything. What needs the PBX (does the extension exist, is the policy known) is
//! checked by [`super::rows`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::pbx::UserField;

/// The fields a CSV can set, in the order `export users` writes them.
pub const FIELDS: [UserField; 7] = [
    UserField::EnterpriseVoice,
    UserField::PrimaryNumber,
    UserField::PrimaryNumberLocation,
    UserField::PrivateNumber,
    UserField::PrivateNumberLocation,
    UserField::CallerIdPolicy,
    UserField::VoiceRoutePolicy,
];
pub const EXTENSION: &str = "extension";
/// The two columns a result CSV adds to the input.
pub const CHANGE_OK: &str = "Change OK";
pub const NOTES: &str = "Notes";
/// The default for `run --max-csv-bytes`.
pub const DEFAULT_MAX_BYTES: usize = 32 * 1024 * 1024;

/// Why a whole file is refused. Nothing of it is applied. Messages here and in row errors say
/// where (line, column, field) and what is wrong, never a cell or header as written: the file
/// may be a Secret the reader of status may not see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SheetError {
    #[error(
        "the CSV is over the size limit: {size} bytes or more, the limit is {limit} bytes; split it into several BulkUserChanges (or raise the operator's --max-csv-bytes)"
    )]
    TooLarge { size: usize, limit: usize },
    #[error(
        "the CSV is empty: it needs a header row naming an `extension` column, then one row per user"
    )]
    Empty,
    #[error("not a CSV file: {0}; save the sheet as CSV (comma-separated, UTF-8) and upload that")]
    NotCsv(String),
    #[error(
        "the CSV has no header row naming an `extension` column (none of the {columns} columns of its line 1 is `extension`); put the header first, as `pbx-operator export users --template` prints it"
    )]
    NoHeader { columns: usize },
    #[error("columns {first} and {second} of the header name the same field; keep one")]
    DuplicateColumn { first: usize, second: usize },
}

/// What a header cell names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Column {
    Extension,
    Field(UserField),
    /// `Change OK` and `Notes` of a result CSV uploaded again: not input.
    Ignored,
    /// A field the operator knows but a CSV cannot set (yet), by its canonical name.
    Unsupported(String),
    Unknown(String),
}

/// A checked CSV: the header as written and what each column means. The data rows stay in the
/// file's own bytes and are parsed again on each pass, so a large file is held once, not as
/// one string per cell (and a clone shares them). A gzip file stays compressed: it is inflated
/// again on each pass (milliseconds per megabyte) rather than held at several times its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sheet {
    pub header: Vec<String>,
    pub columns: Vec<Column>,
    /// Data rows (blank ones not counted).
    pub len: usize,
    /// SHA-256 of the CSV text (inflated), in hex.
    pub sha256: String,
    /// The file as uploaded: a Vec's buffer taken over, not copied (a plain file is up to the
    /// size limit).
    file: Bytes,
    gzip: bool,
}

impl Sheet {
    /// Which column names the user.
    fn extension_column(&self) -> usize {
        self.columns
            .iter()
            .position(|c| *c == Column::Extension)
            .unwrap_or(0)
    }

    /// The data rows, in file order.
    pub fn rows(&self) -> impl Iterator<Item = SheetRow> + Send + 'static + use<> {
        let file = std::io::Cursor::new(self.file.clone());
        let text: Box<dyn Read + Send> = if self.gzip {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        data_rows(records(text))
    }
}

fn data_rows(
    records: impl Iterator<Item = Result<(u64, csv::StringRecord), csv::Error>>,
) -> impl Iterator<Item = SheetRow> {
    records
        .skip(1)
        .filter_map(Result::ok)
        .filter_map(|(line, record)| {
            (!record.iter().all(|c| c.trim().is_empty())).then(|| SheetRow {
                line,
                cells: record.iter().map(str::to_string).collect(),
            })
        })
}

/// The offsets of the line-end bytes (CR, LF) that have passed into the CSV reader and not yet
/// been counted: the reader reads ahead of the record it returns, so the lines before a record
/// are counted from these, not from the reader's buffer.
type LineEnds = Arc<Mutex<VecDeque<(u64, u8)>>>;

/// Passes the text through, noting where its line ends are.
struct NotingLineEnds<R> {
    inner: R,
    offset: u64,
    ends: LineEnds,
}

impl<R: Read> Read for NotingLineEnds<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in buf[..n].iter().enumerate() {
            if *b == b'\r' || *b == b'\n' {
                ends.push_back((self.offset + i as u64, *b));
            }
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// Every record with the file line it starts on. Lines are counted here: the reader's own
/// count is off by one after CRLF line ends.
fn records(
    text: impl Read + Send,
) -> impl Iterator<Item = Result<(u64, csv::StringRecord), csv::Error>> + Send {
    let ends = LineEnds::default();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(NotingLineEnds {
            inner: text,
            offset: 0,
            ends: ends.clone(),
        });
    let mut line = 1u64;
    let mut record = csv::StringRecord::new();
    std::iter::from_fn(move || match reader.read_record(&mut record) {
        Ok(false) => None,
        Err(e) => Some(Err(e)),
        Ok(true) => {
            // The record may be placed at the line end before it: it starts past that.
            let mut start = record.position().map(|p| p.byte()).unwrap_or(0);
            let mut ends = ends.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(&(at, b)) = ends.front() {
                if at > start {
                    break;
                }
                if at == start {
                    start += 1;
                }
                line += u64::from(b == b'\n');
                ends.pop_front();
            }
            Some(Ok((line, record.clone())))
        }
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SheetRow {
    /// The file line the row starts on (the header is line 1).
    pub line: u64,
    pub cells: Vec<String>,
}

/// Header names compare without case, spaces, dashes or underscores: `Primary Number`,
/// `primary_number` and `primaryNumber` are one column.
fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

pub fn column(name: &str) -> Column {
    let n = normalize(name);
    if n == EXTENSION {
        return Column::Extension;
    }
    if n == normalize(CHANGE_OK) || n == normalize(NOTES) {
        return Column::Ignored;
    }
    if let Some(f) = FIELDS.iter().find(|f| normalize(f.name()) == n) {
        return Column::Field(*f);
    }
    if let Some(f) = UserField::ALL.iter().find(|f| normalize(f.name()) == n) {
        return Column::Unsupported(f.name().to_string());
    }
    Column::Unknown(name.trim().to_string())
}

/// Columns whose cells are never echoed into results: a secret field's column, or a name that
/// says it holds a secret. Their cells are replaced by `(redacted)` in the result CSV.
pub fn is_sensitive(name: &str) -> bool {
    let n = normalize(name);
    UserField::ALL
        .iter()
        .any(|f| f.is_secret() && normalize(f.name()) == n)
        || ["password", "secret", "pin", "token", "passwd"]
            .iter()
            .any(|w| n.contains(w))
}

/// Reads a CSV: UTF-8 with or without BOM, CRLF or LF, quoted fields with commas and newlines,
/// gzip-compressed or not. Rows whose cells are all empty (a spreadsheet's trailing lines) are
/// left out. `max_bytes` limits the text, after gunzip.
pub fn read(file: impl Into<Vec<u8>>, max_bytes: usize) -> Result<Sheet, SheetError> {
    let file = file.into();
    let gzip = file.starts_with(&GZIP_MAGIC);
    let inflated = if gzip {
        Some(gunzip(&file, max_bytes)?)
    } else {
        None
    };
    let text = inflated.as_deref().unwrap_or(&file);
    if text.len() > max_bytes {
        return Err(SheetError::TooLarge {
            size: text.len(),
            limit: max_bytes,
        });
    }
    let sha256 = hex::encode(Sha256::digest(text));
    let bytes = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(SheetError::Empty);
    }
    if let Some(at) = bytes.iter().position(|b| *b == 0) {
        return Err(SheetError::NotCsv(format!(
            "it holds binary data (a NUL byte at offset {at})"
        )));
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(SheetError::NotCsv(format!(
            "it is not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        )));
    }
    // The CSV reader strips the BOM itself, as it does when `rows` reads the file again: one
    // BOM stripped here too would make a second one the header of this pass and a row of that.
    let mut all = records(text);
    let header: Vec<String> = match all.next() {
        Some(Ok((_, h))) => h.iter().map(|c| c.trim().to_string()).collect(),
        Some(Err(e)) => return Err(parse_error(&e)),
        None => return Err(SheetError::Empty),
    };
    let columns: Vec<Column> = header.iter().map(|h| column(h)).collect();
    if !columns.contains(&Column::Extension) {
        return Err(SheetError::NoHeader {
            columns: header.len(),
        });
    }
    let mut seen = HashMap::new();
    for (i, (h, c)) in header.iter().zip(&columns).enumerate() {
        if matches!(c, Column::Ignored) {
            continue;
        }
        if let Some(first) = seen.insert(normalize(h), i + 1) {
            return Err(SheetError::DuplicateColumn {
                first,
                second: i + 1,
            });
        }
    }
    let mut len = 0;
    for record in all {
        let (_, record) = record.map_err(|e| parse_error(&e))?;
        if !record.iter().all(|c| c.trim().is_empty()) {
            len += 1;
        }
    }
    drop(inflated);
    Ok(Sheet {
        header,
        columns,
        len,
        sha256,
        file: Bytes::from(file),
        gzip,
    })
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Inflates gzip-compressed bytes, reading at most one byte past the limit, so a small upload
/// cannot expand into a large allocation.
fn gunzip(bytes: &[u8], max_bytes: usize) -> Result<Vec<u8>, SheetError> {
    let mut out = Vec::new();
    let limit = max_bytes as u64 + 1;
    flate2::read::MultiGzDecoder::new(bytes)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| {
            SheetError::NotCsv(format!(
                "it looks gzip-compressed but does not inflate ({e})"
            ))
        })?;
    if out.len() > max_bytes {
        return Err(SheetError::TooLarge {
            size: out.len(),
            limit: max_bytes,
        });
    }
    Ok(out)
}

/// Where the CSV reader gave up, without the text it read.
fn parse_error(e: &csv::Error) -> SheetError {
    SheetError::NotCsv(match e.position() {
        Some(p) => format!("it cannot be read as CSV at line {}", p.line()),
        None => "it cannot be read as CSV".into(),
    })
}

/// What one row asks, after the checks that need nothing but the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowRequest {
    pub line: u64,
    pub extension: String,
    /// Canonical values of the row's non-empty cells, in column order.
    pub values: Vec<(UserField, String)>,
    /// Why the row cannot be applied; empty for a valid row.
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Every row's request, in one pass ([`Requests`] for a plan's several passes).
#[cfg(test)]
pub fn requests(
    sheet: &Sheet,
    closed: &[UserField],
) -> impl Iterator<Item = RowRequest> + Send + 'static + use<> {
    Requests::new(sheet, closed).rows().map(|(r, _)| r)
}

/// A sheet's rows as requests, each checked: cell count, extension, unknown columns, value
/// formats, and rows that clash with each other (one user twice, one number given twice). The
/// cells of `closed` columns (locked Closed by `spec.fields`) are reported and not applied. For
/// as many passes as a plan makes: the checks across rows are made once, and each pass parses
/// the rows again one at a time.
#[derive(Clone)]
pub struct Requests {
    sheet: Sheet,
    closed: Vec<UserField>,
    ext_col: usize,
    clashes: Arc<HashMap<usize, Vec<String>>>,
}

impl Requests {
    pub fn new(sheet: &Sheet, closed: &[UserField]) -> Requests {
        let ext_col = sheet.extension_column();
        Requests {
            clashes: Arc::new(clashes(sheet, closed, ext_col)),
            sheet: sheet.clone(),
            closed: closed.to_vec(),
            ext_col,
        }
    }

    pub fn sheet(&self) -> &Sheet {
        &self.sheet
    }

    /// Every row in file order: what it asks, and its cells as written.
    pub fn rows(&self) -> impl Iterator<Item = (RowRequest, SheetRow)> + Send + 'static + use<> {
        let this = self.clone();
        self.sheet.rows().enumerate().map(move |(i, row)| {
            let mut r = request(&this.sheet, &row, &this.closed, this.ext_col);
            if let Some(notes) = this.clashes.get(&i) {
                r.errors.extend(notes.iter().cloned());
            }
            (r, row)
        })
    }
}

fn request(sheet: &Sheet, row: &SheetRow, closed: &[UserField], ext_col: usize) -> RowRequest {
    let mut r = RowRequest {
        line: row.line,
        extension: row
            .cells
            .get(ext_col)
            .map(|c| c.trim().to_string())
            .unwrap_or_default(),
        ..Default::default()
    };
    if row.cells.len() != sheet.header.len() {
        r.errors.push(format!(
            "the row has {} cells but the header has {} columns; check for a missing or extra comma",
            row.cells.len(),
            sheet.header.len()
        ));
    }
    if r.extension.is_empty() {
        r.errors
            .push("no extension: every row names its user in the extension column".into());
    } else if !valid_extension(&r.extension) {
        r.errors.push(format!(
            "the extension (column {}) is not a valid extension (letters, digits, . _ - +; at most 64)",
            ext_col + 1
        ));
    }
    for (i, (cell, col)) in row.cells.iter().zip(&sheet.columns).enumerate() {
        let cell = cell.trim();
        if cell.is_empty() {
            continue;
        }
        match col {
            Column::Extension | Column::Ignored => {}
            Column::Unknown(_) => r.errors.push(format!(
                "unknown column {}: its header is not a field a CSV can set (columns: extension, {}); remove the column or empty its cells",
                i + 1,
                FIELDS.map(|f| f.name()).join(", ")
            )),
            Column::Unsupported(name) => r.errors.push(format!(
                "column {} ({name}) cannot be set from a CSV yet (columns: extension, {}); use spec.fields for it",
                i + 1,
                FIELDS.map(|f| f.name()).join(", ")
            )),
            Column::Field(f) if closed.contains(f) => r.warnings.push(format!(
                "{f} not applied: spec.fields locks it Closed"
            )),
            Column::Field(f) => match canonical(*f, cell) {
                Ok(v) => r.values.push((*f, v)),
                Err(e) => r.errors.push(e),
            },
        }
    }
    let mut given: Vec<&str> = r
        .values
        .iter()
        .filter(|(f, _)| f.is_number())
        .map(|(_, v)| v.as_str())
        .collect();
    let n = given.len();
    given.dedup();
    if given.len() < n {
        r.errors.push(
            "the same number is given as primaryNumber and privateNumber; a user holds a number once"
                .into(),
        );
    }
    r
}

/// What a row could clash on: its extension, and the numbers it gives.
fn clash_keys(
    sheet: &Sheet,
    row: &SheetRow,
    closed: &[UserField],
    ext_col: usize,
) -> (Option<String>, Vec<String>) {
    let extension = row
        .cells
        .get(ext_col)
        .map(|c| c.trim())
        .filter(|e| !e.is_empty())
        .map(str::to_string);
    let mut numbers: Vec<String> = row
        .cells
        .iter()
        .zip(&sheet.columns)
        .filter_map(|(cell, col)| match col {
            Column::Field(f) if f.is_number() && !closed.contains(f) => e164(cell.trim()),
            _ => None,
        })
        .collect();
    numbers.sort();
    numbers.dedup();
    (extension, numbers)
}

fn key_hash(kind: u8, key: &str) -> u64 {
    let mut h = DefaultHasher::new();
    (kind, key).hash(&mut h);
    h.finish()
}

/// One user in two rows, or one number given by two rows: which should win is a person's call,
/// so none of the rows involved is applied. Returns the notes by row index.
///
/// A first pass keeps a hash per key, not the key: a file of 100,000 rows names 100,000
/// extensions and as many numbers, and only the rows whose hashes repeat are read again for
/// their keys as written.
fn clashes(sheet: &Sheet, closed: &[UserField], ext_col: usize) -> HashMap<usize, Vec<String>> {
    let mut hashes: Vec<(u64, u32)> = Vec::new();
    for (i, row) in sheet.rows().enumerate() {
        let (extension, numbers) = clash_keys(sheet, &row, closed, ext_col);
        hashes.extend(extension.map(|e| (key_hash(0, &e), i as u32)));
        hashes.extend(numbers.iter().map(|n| (key_hash(1, n), i as u32)));
    }
    hashes.sort_unstable();
    let mut suspects: HashSet<usize> = HashSet::new();
    for run in hashes.chunk_by(|a, b| a.0 == b.0).filter(|r| r.len() > 1) {
        suspects.extend(run.iter().map(|(_, i)| *i as usize));
    }
    drop(hashes);
    let mut by_extension: BTreeMap<String, Vec<(usize, u64)>> = BTreeMap::new();
    let mut by_number: BTreeMap<String, Vec<(usize, u64)>> = BTreeMap::new();
    if !suspects.is_empty() {
        for (i, row) in sheet.rows().enumerate() {
            if !suspects.contains(&i) {
                continue;
            }
            let (extension, numbers) = clash_keys(sheet, &row, closed, ext_col);
            if let Some(e) = extension {
                by_extension.entry(e).or_default().push((i, row.line));
            }
            for n in numbers {
                by_number.entry(n).or_default().push((i, row.line));
            }
        }
    }
    let others = |rows: &[(usize, u64)], except: usize| -> String {
        rows.iter()
            .filter(|(i, _)| *i != except)
            .map(|(_, line)| line.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut notes: HashMap<usize, Vec<String>> = HashMap::new();
    for rows in by_extension.values().filter(|r| r.len() > 1) {
        for &(i, _) in rows {
            notes.entry(i).or_default().push(format!(
                "this row's extension also has a row on line {}: none of its rows is applied; keep one row per user",
                others(rows, i)
            ));
        }
    }
    for rows in by_number.values().filter(|r| r.len() > 1) {
        for &(i, _) in rows {
            notes.entry(i).or_default().push(format!(
                "a number of this row is also given on line {}: a number belongs to one user; keep it in one row",
                others(rows, i)
            ));
        }
    }
    notes
}

fn valid_extension(e: &str) -> bool {
    e.len() <= 64
        && e.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
}

/// A cell's value in the canonical form the PBX stores and `export users` prints.
pub fn canonical(field: UserField, cell: &str) -> Result<String, String> {
    match field {
        UserField::PrimaryNumber | UserField::PrivateNumber => e164(cell).ok_or_else(|| {
            format!("{field} is not an E.164 number (a + and 7 to 15 digits, e.g. +15550100201)")
        }),
        UserField::EnterpriseVoice | UserField::Locked => {
            match cell.to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" | "on" | "enabled" => Ok("true".into()),
                "false" | "no" | "0" | "off" | "disabled" => Ok("false".into()),
                _ => Err(format!(
                    "{field} is not true or false (yes/no and 1/0 work too)"
                )),
            }
        }
        UserField::CallerIdPolicy | UserField::VoiceRoutePolicy => {
            let ok = cell.len() <= 64
                && cell
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric())
                && cell
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if ok {
                Ok(cell.to_string())
            } else {
                Err(format!(
                    "{field} is not a policy name (letters, digits, . _ -; at most 64)"
                ))
            }
        }
        UserField::PrimaryNumberLocation | UserField::PrivateNumberLocation => {
            if cell.chars().count() <= 128 && !cell.chars().any(char::is_control) {
                Ok(cell.to_string())
            } else {
                Err(format!(
                    "{field} is longer than 128 characters or holds control characters"
                ))
            }
        }
        other => Err(format!("{other} cannot be set from a CSV")),
    }
}

/// `+1 (555) 010-0201` -> `+15550100201`; None unless it is `+`, a non-zero digit, then 6 to 14
/// more digits.
pub fn e164(cell: &str) -> Option<String> {
    let compact: String = cell
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let digits = compact.strip_prefix('+')?;
    let ok = (7..=15).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_digit())
        && !digits.starts_with('0');
    ok.then_some(compact)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "extension,enterpriseVoice,primaryNumber,primaryNumberLocation,privateNumber,privateNumberLocation,callerIdPolicy,voiceRoutePolicy";

    fn sheet(text: &str) -> Sheet {
        read(text.as_bytes(), DEFAULT_MAX_BYTES).unwrap()
    }

    #[test]
    fn reads_bom_crlf_and_quoted_fields() {
        let text = "\u{feff}extension,primaryNumberLocation\r\n201,\"Berlin, 3rd floor\"\r\n202,\"New\nYork\"\r\n";
        let s = sheet(text);
        assert_eq!(s.header, ["extension", "primaryNumberLocation"]);
        assert_eq!(s.columns[0], Column::Extension);
        let rows: Vec<SheetRow> = s.rows().collect();
        assert_eq!((s.len, rows.len()), (2, 2));
        assert_eq!(rows[0].cells[1], "Berlin, 3rd floor");
        assert_eq!(rows[1].cells[1], "New\nYork");
        // One BOM is the encoding's; a second is text, so the header is that cell on its own
        // line and no column names the extension: refused, the same for every pass.
        assert!(matches!(
            read(
                "\u{feff}\u{feff}\r\nprimaryNumber,extension\r\n201,+15550100201\r\n".as_bytes(),
                DEFAULT_MAX_BYTES
            ),
            Err(SheetError::NoHeader { .. })
        ));
        assert_eq!((rows[0].line, rows[1].line), (2, 3));
    }

    #[test]
    fn header_names_are_forgiving_and_result_columns_are_ignored() {
        let s = sheet(
            "Extension,Primary Number,enterprise_voice,Change OK,Notes\n201,+15550100201,yes,true,x\n",
        );
        assert_eq!(
            s.columns,
            [
                Column::Extension,
                Column::Field(UserField::PrimaryNumber),
                Column::Field(UserField::EnterpriseVoice),
                Column::Ignored,
                Column::Ignored
            ]
        );
        let r: Vec<RowRequest> = requests(&s, &[]).collect();
        assert!(r[0].errors.is_empty(), "{:?}", r[0].errors);
        assert_eq!(
            r[0].values,
            [
                (UserField::PrimaryNumber, "+15550100201".into()),
                (UserField::EnterpriseVoice, "true".into())
            ]
        );
    }

    #[test]
    fn whole_file_refusals() {
        assert!(matches!(
            read(b"extension\n201\n", 5),
            Err(SheetError::TooLarge { size: 14, limit: 5 })
        ));
        assert_eq!(read(b"  \n", 100), Err(SheetError::Empty));
        assert!(matches!(
            read(b"\x89PNG\r\n\x1a\n\0\0", 100),
            Err(SheetError::NotCsv(_))
        ));
        assert!(matches!(
            read(b"ext\xffension\n", 100),
            Err(SheetError::NotCsv(_))
        ));
        let e = read(b"201,+15550100201\n202,+15550100202\n", 100).unwrap_err();
        assert_eq!(e, SheetError::NoHeader { columns: 2 });
        assert!(e.to_string().contains("export users --template"));
        assert_eq!(
            read(b"extension,primaryNumber,Primary Number\n", 100),
            Err(SheetError::DuplicateColumn {
                first: 2,
                second: 3
            })
        );
    }

    #[test]
    fn empty_cells_leave_fields_alone_and_blank_rows_are_dropped() {
        let s = sheet(&format!("{HEADER}\n201,,,,,,Anonymous,\n,,,,,,,\n"));
        assert_eq!(s.len, 1);
        let r: Vec<RowRequest> = requests(&s, &[]).collect();
        assert_eq!(
            r[0].values,
            [(UserField::CallerIdPolicy, "Anonymous".into())]
        );
    }

    #[test]
    fn row_errors_name_the_problem() {
        let s = sheet(
            "extension,primaryNumber,enterpriseVoice,department,firstName,callerIdPolicy\n\
             201,12345,maybe,Sales,Ana,Default\n\
             ,+15550100202,,,,\n\
             203,+15550100203\n\
             20 4,,,,,\n\
             205,,,,,Anon ymous\n",
        );
        let r: Vec<RowRequest> = requests(&s, &[]).collect();
        let all = |i: usize| r[i].errors.join(" | ");
        assert!(all(0).contains("not an E.164 number"), "{}", all(0));
        assert!(all(0).contains("not true or false"), "{}", all(0));
        assert!(all(0).contains("unknown column 4"), "{}", all(0));
        assert!(
            all(0).contains("column 5 (firstName) cannot be set from a CSV"),
            "{}",
            all(0)
        );
        assert!(all(1).contains("no extension"), "{}", all(1));
        assert!(
            all(2).contains("2 cells but the header has 6"),
            "{}",
            all(2)
        );
        assert!(
            all(3).contains("extension (column 1) is not a valid extension"),
            "{}",
            all(3)
        );
        assert!(all(4).contains("not a policy name"), "{}", all(4));
    }

    /// The file may be a Secret: no refusal or row error repeats what it holds.
    #[test]
    fn messages_never_quote_the_file() {
        const T: &str = "s3cr3tT0ken";
        let refusals = [
            read(format!("postgres://pbx:{T}@db/pbx\n").as_bytes(), 1000),
            read(format!("extension,x{T},X{T}\n").as_bytes(), 1000),
            read([T.as_bytes(), b"\xff\n"].concat(), 1000),
        ];
        for r in refusals {
            let e = r.unwrap_err().to_string();
            assert!(!e.to_lowercase().contains(&T.to_lowercase()), "{e}");
        }
        let s = sheet(&format!(
            "extension,{T},enterpriseVoice,primaryNumber,callerIdPolicy,primaryNumberLocation\n\
             {T}!,{T},{T},+1{T},{T}!,{T}{}\n\
             {T},,,,{T}/,\n\
             {T},,,,,\n",
            "x".repeat(200)
        ));
        for r in requests(&s, &[]) {
            for e in &r.errors {
                assert!(!e.contains(T), "line {}: {e}", r.line);
            }
            assert!(!r.errors.is_empty(), "line {}", r.line);
        }
    }

    #[test]
    fn an_unknown_column_with_empty_cells_is_harmless() {
        let s = sheet("extension,department,callerIdPolicy\n201,,Default\n");
        assert!(requests(&s, &[]).next().unwrap().errors.is_empty());
    }

    #[test]
    fn duplicate_users_and_numbers_fail_every_row_involved() {
        let s = sheet(
            "extension,primaryNumber,privateNumber\n\
             201,+15550100201,\n\
             202,,+15550100201\n\
             201,,\n\
             204,+15550100204,+15550100204\n\
             205,+15550100205,\n",
        );
        let r: Vec<RowRequest> = requests(&s, &[]).collect();
        assert!(
            r[0].errors
                .iter()
                .any(|e| e.contains("extension also has a row on line 4"))
        );
        assert!(
            r[2].errors
                .iter()
                .any(|e| e.contains("extension also has a row on line 2"))
        );
        assert!(
            r[0].errors
                .iter()
                .any(|e| e.contains("number of this row is also given on line 3"))
        );
        assert!(
            r[1].errors
                .iter()
                .any(|e| e.contains("number of this row is also given on line 2"))
        );
        assert!(
            r[3].errors
                .iter()
                .any(|e| e.contains("primaryNumber and privateNumber"))
        );
        assert!(r[4].errors.is_empty());
    }

    #[test]
    fn closed_columns_are_reported_not_applied() {
        let s = sheet("extension,callerIdPolicy,voiceRoutePolicy\n201,Anonymous,Domestic\n");
        let r: Vec<RowRequest> = requests(&s, &[UserField::CallerIdPolicy]).collect();
        assert!(r[0].errors.is_empty());
        assert_eq!(
            r[0].values,
            [(UserField::VoiceRoutePolicy, "Domestic".into())]
        );
        assert_eq!(
            r[0].warnings,
            ["callerIdPolicy not applied: spec.fields locks it Closed"]
        );
    }

    #[test]
    fn secret_columns_are_recognised() {
        for name in ["password", "Voicemail PIN", "voicemailPin", "sip_secret"] {
            assert!(is_sensitive(name), "{name}");
        }
        for name in ["extension", "primaryNumber", "callerIdPolicy", "Notes"] {
            assert!(!is_sensitive(name), "{name}");
        }
    }

    #[test]
    fn e164_accepts_punctuation_and_refuses_the_rest() {
        assert_eq!(e164("+1 (555) 010-0201").as_deref(), Some("+15550100201"));
        for bad in [
            "15550100201",
            "+0555010020",
            "+123",
            "+1555010020112345",
            "+1555O100201",
            "+",
        ] {
            assert_eq!(e164(bad), None, "{bad}");
        }
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_is_inflated_within_the_limit_and_read_like_text() {
        let text =
            b"extension,callerIdPolicy\r\n201,Default\r\n\r\n\"202\",\"Anony\nmous\"\n203,x\n"
                .to_vec();
        let plain = read(text.clone(), 1000).unwrap();
        let zipped = read(gz(&text), 1000).unwrap();
        assert_eq!(zipped.header, plain.header);
        assert_eq!(zipped.sha256, plain.sha256, "the hash is of the text");
        let rows = |s: &Sheet| s.rows().collect::<Vec<_>>();
        assert_eq!(rows(&zipped), rows(&plain));
        let lines: Vec<u64> = rows(&plain).iter().map(|r| r.line).collect();
        assert_eq!(
            lines,
            [2, 4, 6],
            "lines counted across CRLF, blank lines and quoted newlines"
        );
        let bomb = gz(&vec![b'a'; 100_000]);
        assert!(matches!(
            read(bomb, 1000),
            Err(SheetError::TooLarge { limit: 1000, .. })
        ));
        assert!(matches!(
            read(vec![0x1f, 0x8b, 1, 2, 3], 1000),
            Err(SheetError::NotCsv(_))
        ));
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Arbitrary bytes: an error or a sheet, never a panic; and every row checks.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
                if let Ok(s) = read(bytes.clone(), DEFAULT_MAX_BYTES) {
                    let r: Vec<RowRequest> = requests(&s, &[UserField::CallerIdPolicy]).collect();
                    prop_assert_eq!(r.len(), s.len);
                }
            }

            /// CSV-shaped text: quotes, commas, CR/LF, BOMs and known headers mixed at random.
            #[test]
            fn csv_shaped_text_never_panics(parts in proptest::collection::vec(
                prop_oneof![
                    Just("extension".to_string()), Just("primaryNumber".to_string()),
                    Just("privateNumber".to_string()), Just("enterpriseVoice".to_string()),
                    Just(",".to_string()), Just("\"".to_string()), Just("\r\n".to_string()),
                    Just("\n".to_string()), Just("\u{feff}".to_string()), Just("+15550100201".to_string()),
                    "[ -~]{0,12}", "\\PC{0,4}",
                ], 0..64)) {
                let text: String = parts.concat();
                if let Ok(s) = read(text.as_bytes(), DEFAULT_MAX_BYTES) {
                    let r: Vec<RowRequest> = requests(&s, &[]).collect();
                    prop_assert_eq!(r.len(), s.len);
                    for req in &r {
                        for (f, v) in &req.values {
                            let again = canonical(*f, v);
                            prop_assert_eq!(again.as_ref(), Ok(v), "canonical values are fixed points");
                        }
                    }
                }
            }
        }
    }
}
