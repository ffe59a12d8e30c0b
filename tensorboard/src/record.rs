//! The bytes of an event file: hand-encoded protobuf messages in TFRecord frames.
//!
//! Messages (field numbers from TensorFlow's `event.proto` and `summary.proto`):
//! `Event { double wall_time = 1; int64 step = 2; oneof { string file_version = 3;
//! Summary summary = 5; SessionLog session_log = 7; } }`,
//! `Summary { repeated Value value = 1; }`, `Value { string tag = 1; float simple_value = 2; }`,
//! `SessionLog { SessionStatus status = 1; }` with `START = 1`. (`session_log` is field 7;
//! field 6 is the deprecated `log_message`, which TensorBoard ignores for restarts.)

/// CRC-32C (Castagnoli, reflected polynomial `0x82F63B78`) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-32C of `data`.
fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| {
        CRC32C_TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8)
    })
}

/// The masked CRC-32C TFRecord stores, so that CRCs of data containing CRCs stay well mixed.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// Frames one record: `u64 len`, `u32 masked_crc32c(len bytes)`, data, `u32 masked_crc32c(data)`,
/// all little-endian.
pub(crate) fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Wire type of a varint field.
const VARINT: u8 = 0;
/// Wire type of a 64-bit fixed-width field.
const FIXED64: u8 = 1;
/// Wire type of a length-delimited field.
const LEN: u8 = 2;
/// Wire type of a 32-bit fixed-width field.
const FIXED32: u8 = 5;

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u8, wire_type: u8) {
    out.push(field << 3 | wire_type);
}

fn put_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What an event carries besides its time and step.
pub(crate) enum Payload<'a> {
    /// `file_version` (field 3): the first event of every file.
    FileVersion(&'a str),
    /// `summary` (field 5) holding one `simple_value` per `(tag, value)`.
    Scalars(&'a [(&'a str, f32)]),
    /// `session_log` (field 7) with status `START`: TensorBoard drops earlier events whose step
    /// is at least this event's step.
    SessionStart,
}

/// Encodes an `Event` message.
pub(crate) fn encode_event(wall_time_s: f64, step: i64, payload: &Payload<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    put_key(&mut out, 1, FIXED64);
    out.extend_from_slice(&wall_time_s.to_le_bytes());
    put_key(&mut out, 2, VARINT);
    // int64 is encoded as its two's-complement bits (negative steps take 10 bytes).
    put_varint(&mut out, step as u64);
    match payload {
        Payload::FileVersion(version) => put_bytes(&mut out, 3, version.as_bytes()),
        Payload::Scalars(scalars) => {
            let mut summary = Vec::new();
            for (tag, value) in scalars.iter() {
                let mut entry = Vec::new();
                put_bytes(&mut entry, 1, tag.as_bytes());
                put_key(&mut entry, 2, FIXED32);
                entry.extend_from_slice(&value.to_le_bytes());
                put_bytes(&mut summary, 1, &entry);
            }
            put_bytes(&mut out, 5, &summary);
        }
        Payload::SessionStart => {
            let mut session_log = Vec::new();
            put_key(&mut session_log, 1, VARINT);
            put_varint(&mut session_log, 1);
            put_bytes(&mut out, 7, &session_log);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn masked_crc_matches_tensorboard() {
        // Values from tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c.
        assert_eq!(masked_crc32c(b""), 0xA282_EAD8);
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn frame_matches_a_record_written_by_tensorboard() {
        // Event { wall_time: 1.0, file_version: "brain.Event:2" }, framed by TensorBoard's
        // Python record writer.
        let data = unhex("09000000000000f03f1a0d627261696e2e4576656e743a32");
        let expected = unhex(
            "1800000000000000a37f4b22\
             09000000000000f03f1a0d627261696e2e4576656e743a32\
             86bf577a",
        );
        assert_eq!(frame(&data), expected);
    }

    #[test]
    fn varints_encode_like_protobuf() {
        let encode = |v: u64| {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            out
        };
        assert_eq!(encode(0), [0x00]);
        assert_eq!(encode(300), [0xAC, 0x02]);
        assert_eq!(encode(-1i64 as u64).len(), 10);
    }

    #[test]
    fn scalar_event_encodes_field_by_field() {
        let event = encode_event(1.0, 300, &Payload::Scalars(&[("a", 0.5)]));
        let expected = [
            &[0x09][..],
            &1.0f64.to_le_bytes(),
            &[0x10, 0xAC, 0x02], // step = 300
            &[0x2A, 0x0A],       // summary, 10 bytes
            &[0x0A, 0x08],       // value, 8 bytes
            &[0x0A, 0x01, b'a'], // tag = "a"
            &[0x15],             // simple_value
            &0.5f32.to_le_bytes(),
        ]
        .concat();
        assert_eq!(event, expected);
    }

    #[test]
    fn session_start_event_encodes_status_start() {
        let event = encode_event(0.0, 5, &Payload::SessionStart);
        assert_eq!(&event[9..], &[0x10, 0x05, 0x3A, 0x02, 0x08, 0x01]);
    }
}
