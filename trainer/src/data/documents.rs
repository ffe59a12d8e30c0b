//! Reading documents from the files datasets ship as, streamed in batches so a multi-GB
//! input never sits in memory whole.
//!
//! | file | documents |
//! | --- | --- |
//! | `.parquet` | the string column `text`, one document per row (FineWeb's layout); snappy, zstd, gzip pages |
//! | `.jsonl`, `.jsonl.gz`, `.jsonl.zst` | one JSON object per line, its string field `text` |
//! | `.txt` | the whole file |
//!
//! Errors name the file and, where known, the line (JSONL) or row (parquet).
use anyhow::{anyhow, bail, Context, Result};
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Documents handed to the callback at once: about this many bytes of text.
pub const BATCH_BYTES: usize = 8 << 20;

/// The input formats, from the file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Parquet,
    Jsonl,
    JsonlGz,
    JsonlZst,
    Txt,
}

impl Format {
    pub fn of(path: &Path) -> Result<Format> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        Ok(match () {
            _ if name.ends_with(".parquet") => Format::Parquet,
            _ if name.ends_with(".jsonl") => Format::Jsonl,
            _ if name.ends_with(".jsonl.gz") => Format::JsonlGz,
            _ if name.ends_with(".jsonl.zst") => Format::JsonlZst,
            _ if name.ends_with(".txt") => Format::Txt,
            _ => bail!(
                "input {}: expected .parquet, .jsonl, .jsonl.gz, .jsonl.zst or .txt",
                path.display()
            ),
        })
    }
}

/// Calls `f(documents, file_bytes_done)` for consecutive batches of the documents of `path`, in
/// file order; `file_bytes_done` is how far into the file on disk the batch ends.
pub fn for_each_batch(
    path: &Path,
    mut f: impl FnMut(Vec<String>, u64) -> Result<()>,
) -> Result<()> {
    let format = Format::of(path)?;
    let open = || File::open(path).with_context(|| format!("opening {}", path.display()));
    match format {
        Format::Txt => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let len = bytes.len() as u64;
            let text = String::from_utf8(bytes).map_err(|e| {
                anyhow!(
                    "{}: not UTF-8 text (invalid byte at offset {})",
                    path.display(),
                    e.utf8_error().valid_up_to()
                )
            })?;
            f(vec![text], len)
        }
        Format::Parquet => parquet_batches(path, open()?, f),
        Format::Jsonl | Format::JsonlGz | Format::JsonlZst => {
            let file = open()?;
            let counted = std::rc::Rc::new(std::cell::Cell::new(0u64));
            let reader: Box<dyn Read> = match format {
                Format::JsonlGz => Box::new(flate2::read::MultiGzDecoder::new(Shared {
                    inner: file,
                    bytes: counted.clone(),
                })),
                Format::JsonlZst => Box::new(
                    zstd::stream::read::Decoder::new(Shared {
                        inner: file,
                        bytes: counted.clone(),
                    })
                    .with_context(|| format!("{}: starting zstd decompression", path.display()))?,
                ),
                _ => Box::new(Shared {
                    inner: file,
                    bytes: counted.clone(),
                }),
            };
            jsonl_batches(path, BufReader::with_capacity(1 << 20, reader), |docs| {
                f(docs, counted.get())
            })
        }
    }
}

/// Counts the bytes read from the file on disk (progress over compressed inputs) in a cell
/// the caller keeps while a decompressor owns the reader.
struct Shared<R> {
    inner: R,
    bytes: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Shared<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.set(self.bytes.get() + n as u64);
        Ok(n)
    }
}

fn jsonl_batches(
    path: &Path,
    mut reader: impl BufRead,
    mut f: impl FnMut(Vec<String>) -> Result<()>,
) -> Result<()> {
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let mut line = String::new();
    for number in 1.. {
        line.clear();
        let n = reader.read_line(&mut line).with_context(|| {
            format!(
                "{} line {number}: reading (corrupt or truncated file?)",
                path.display()
            )
        })?;
        if n == 0 {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {number}: not JSON", path.display()))?;
        let Some(serde_json::Value::String(text)) = v.get("text") else {
            bail!("{} line {number}: no string field `text`", path.display());
        };
        batch_bytes += text.len();
        batch.push(text.clone());
        if batch_bytes >= BATCH_BYTES {
            f(std::mem::take(&mut batch))?;
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        f(batch)?;
    }
    Ok(())
}

/// The `text` column of every row group, read with the column API (no row objects).
fn parquet_batches(
    path: &Path,
    file: File,
    mut f: impl FnMut(Vec<String>, u64) -> Result<()>,
) -> Result<()> {
    let file_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let reader = SerializedFileReader::new(file)
        .map_err(|e| anyhow!("{}: not a readable parquet file: {e}", path.display()))?;
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema_descr();
    let names: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
    let column = names.iter().position(|n| n == "text").ok_or_else(|| {
        anyhow!(
            "{}: no column `text` (columns: {})",
            path.display(),
            names.join(", ")
        )
    })?;
    let descr = schema.column(column);
    if descr.physical_type() != PhysicalType::BYTE_ARRAY || descr.max_rep_level() > 0 {
        bail!(
            "{}: column `text` is {}{}, expected a string column",
            path.display(),
            descr.physical_type(),
            if descr.max_rep_level() > 0 {
                " (repeated)"
            } else {
                ""
            }
        );
    }
    let nullable = descr.max_def_level() > 0;
    let mut row = 0usize;
    let mut done = 0u64;
    let groups = meta.num_row_groups();
    for g in 0..groups {
        let at = |row: usize| format!("{} row {row}", path.display());
        let group_meta = meta.row_group(g);
        let mut col = match reader
            .get_row_group(g)
            .and_then(|rg| rg.get_column_reader(column))
            .map_err(|e| anyhow!("{} row group {g}: {e}", path.display()))?
        {
            ColumnReader::ByteArrayColumnReader(r) => r,
            _ => bail!("{}: column `text` is not a byte array", path.display()),
        };
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let rows = group_meta.num_rows() as usize;
        let mut read = 0;
        while read < rows {
            let mut values = Vec::new();
            let mut defs = Vec::new();
            let (records, _, _) = col
                .read_records(
                    4096.min(rows - read),
                    nullable.then_some(&mut defs),
                    None,
                    &mut values,
                )
                .map_err(|e| anyhow!("{}: {e} (corrupt page?)", at(row)))?;
            if records == 0 {
                bail!(
                    "{}: row group {g} ends after {read} of its {rows} rows (truncated file?)",
                    at(row)
                );
            }
            if nullable {
                if let Some(i) = defs.iter().position(|&d| d < descr.max_def_level()) {
                    bail!("{}: `text` is null", at(row + i));
                }
            }
            for (i, v) in values.into_iter().enumerate() {
                let text = String::from_utf8(v.data().to_vec())
                    .map_err(|_| anyhow!("{}: `text` is not UTF-8", at(row + i)))?;
                batch_bytes += text.len();
                batch.push(text);
            }
            row += records;
            read += records;
            if batch_bytes >= BATCH_BYTES {
                f(std::mem::take(&mut batch), done)?;
                batch_bytes = 0;
            }
        }
        done = if g + 1 == groups {
            file_bytes
        } else {
            (done + group_meta.compressed_size() as u64).min(file_bytes)
        };
        if !batch.is_empty() {
            f(batch, done)?;
        }
    }
    Ok(())
}

/// Every document of `path`, in order (small inputs and tests).
pub fn read_all(path: &Path) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for_each_batch(path, |batch, _| {
        docs.extend(batch);
        Ok(())
    })?;
    Ok(docs)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::io::Write;
    use std::sync::Arc;

    /// Writes `docs` as a parquet file with an `id` column and a `text` column (FineWeb's
    /// layout), `per_group` rows per row group.
    pub(crate) fn write_parquet(path: &Path, docs: &[&str], per_group: usize, codec: Compression) {
        let schema = Arc::new(
            parse_message_type("message doc { required int64 id; required binary text (STRING); }")
                .unwrap(),
        );
        let props = Arc::new(WriterProperties::builder().set_compression(codec).build());
        let mut w = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
        for (g, group) in docs.chunks(per_group).enumerate() {
            let mut rg = w.next_row_group().unwrap();
            let mut id = rg.next_column().unwrap().unwrap();
            let ids: Vec<i64> = (0..group.len() as i64)
                .map(|i| (g * per_group) as i64 + i)
                .collect();
            id.typed::<parquet::data_type::Int64Type>()
                .write_batch(&ids, None, None)
                .unwrap();
            id.close().unwrap();
            let mut text = rg.next_column().unwrap().unwrap();
            let values: Vec<ByteArray> = group.iter().map(|d| ByteArray::from(*d)).collect();
            text.typed::<ByteArrayType>()
                .write_batch(&values, None, None)
                .unwrap();
            text.close().unwrap();
            rg.close().unwrap();
        }
        w.close().unwrap();
    }

    /// Writes `docs` as JSONL, compressed as the file name says.
    pub(crate) fn write_jsonl(path: &Path, docs: &[&str]) {
        let mut text = String::new();
        for d in docs {
            text.push_str(&serde_json::json!({ "text": d, "id": 1 }).to_string());
            text.push('\n');
        }
        let f = File::create(path).unwrap();
        match Format::of(path).unwrap() {
            Format::JsonlZst => {
                let mut z = zstd::stream::write::Encoder::new(f, 3).unwrap();
                z.write_all(text.as_bytes()).unwrap();
                z.finish().unwrap();
            }
            Format::JsonlGz => {
                let mut z = flate2::write::GzEncoder::new(f, flate2::Compression::default());
                z.write_all(text.as_bytes()).unwrap();
                z.finish().unwrap();
            }
            _ => std::io::BufWriter::new(f)
                .write_all(text.as_bytes())
                .unwrap(),
        }
    }

    const DOCS: [&str; 5] = ["first document", "zwei\nZeilen", "", "日本語 🦀", "last"];

    #[test]
    fn every_format_reads_the_same_documents() {
        let d = tempfile::tempdir().unwrap();
        for name in ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"] {
            let p = d.path().join(name);
            write_jsonl(&p, &DOCS);
            assert_eq!(read_all(&p).unwrap(), DOCS, "{name}");
        }
        let codecs = [
            Compression::UNCOMPRESSED,
            Compression::SNAPPY,
            Compression::ZSTD(ZstdLevel::default()),
            Compression::GZIP(Default::default()),
        ];
        for (i, codec) in codecs.into_iter().enumerate() {
            let p = d.path().join(format!("a{i}.parquet"));
            write_parquet(&p, &DOCS, 2, codec);
            assert_eq!(read_all(&p).unwrap(), DOCS, "{codec:?}");
        }
        let p = d.path().join("a.txt");
        std::fs::write(&p, "all of it\none document").unwrap();
        assert_eq!(read_all(&p).unwrap(), ["all of it\none document"]);
    }

    #[test]
    fn corrupt_inputs_name_the_file_and_place() {
        let d = tempfile::tempdir().unwrap();
        let err = |p: &Path| format!("{:#}", read_all(p).unwrap_err());

        let p = d.path().join("bad.jsonl");
        std::fs::write(&p, "{\"text\": \"ok\"}\n{\"text\": 5}\n").unwrap();
        let e = err(&p);
        assert!(
            e.contains("bad.jsonl line 2") && e.contains("`text`"),
            "{e}"
        );

        let p = d.path().join("cut.jsonl.zst");
        write_jsonl(&p, &DOCS);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 6]).unwrap();
        let e = err(&p);
        assert!(e.contains("cut.jsonl.zst line"), "{e}");

        let p = d.path().join("bad.jsonl.gz");
        std::fs::write(&p, b"not gzip at all").unwrap();
        assert!(err(&p).contains("bad.jsonl.gz line 1"), "{}", err(&p));

        let p = d.path().join("bad.parquet");
        std::fs::write(&p, b"PAR1 not really").unwrap();
        let e = err(&p);
        assert!(e.contains("bad.parquet") && e.contains("parquet"), "{e}");

        let p = d.path().join("flipped.parquet");
        write_parquet(&p, &DOCS, 5, Compression::SNAPPY);
        let mut bytes = std::fs::read(&p).unwrap();
        // Inside the first data page of the `text` column chunk (after the `id` chunk).
        let at = bytes.windows(5).position(|w| w == b"first").unwrap();
        bytes[at - 16..at].fill(0xFF);
        std::fs::write(&p, &bytes).unwrap();
        let e = err(&p);
        assert!(e.contains("flipped.parquet row"), "{e}");

        let p = d.path().join("notext.parquet");
        let schema = Arc::new(parse_message_type("message doc { required int64 id; }").unwrap());
        let w = SerializedFileWriter::new(
            File::create(&p).unwrap(),
            schema,
            Arc::new(WriterProperties::builder().build()),
        )
        .unwrap();
        w.close().unwrap();
        let e = err(&p);
        assert!(e.contains("notext.parquet: no column `text`"), "{e}");

        let e = format!("{:#}", Format::of(Path::new("x.csv")).unwrap_err());
        assert!(e.contains("x.csv") && e.contains(".parquet"), "{e}");
    }
}
