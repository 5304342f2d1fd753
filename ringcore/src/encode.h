/* SPDX-License-Identifier: MIT */
/*
 * Records to JSON by schema, without Python: the core of ringcore.Encoder.
 *
 * A framed record is the 16-byte header of service/record.py ("RS", u16
 * type, u32 reserved = 0, u64 ts_ns) and the fields of the schema its type
 * names, little-endian, at fixed offsets. Each record becomes one JSON
 * object:
 *
 *   {"id":POS,"ts_ns":TS,"type":"NAME",FIELD:VALUE...,"_extra":"BASE64"}
 *
 * and a record no schema decodes (unframed, unknown type, shorter than its
 * schema) is delivered raw:
 *
 *   {"id":POS,"ts_ns":NOW,"type":"raw","type_id":N,"error":"...","raw":"B64"}
 *
 * service/schema.py has the Python reference this is tested against.
 *
 * The JSON is written straight into one growable buffer. Everything that
 * depends only on the schema (keys, the type name, enum names) is escaped
 * once, when the schema is set up, and every record's worst-case length is
 * known from its schema and its length, so the buffer is grown at most once
 * per record and the writers below never check for room.
 */
#ifndef RINGCORE_ENCODE_H
#define RINGCORE_ENCODE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define ENC_HEADER_SZ 16U
/* a record of at most this many bytes: as RC_MAX_RECORD_SZ */
#define ENC_MAX_RECORD_SZ (UINT32_MAX / 4)

enum enc_kind {
	ENC_U8,
	ENC_U16,
	ENC_U32,
	ENC_U64,
	ENC_I8,
	ENC_I16,
	ENC_I32,
	ENC_I64,
	ENC_F32,
	ENC_F64,
	ENC_CHAR,   /* NUL-padded UTF-8 text */
	ENC_HEX,    /* bytes, lowercase hex */
	ENC_BASE64, /* bytes, standard base64 with padding */
	ENC_PAD,    /* skipped */
	ENC_NKINDS,
};

struct enc_enum {
	/* The value as the field reads it, signed kinds with the sign bit
	 * flipped: then unsigned order is numeric order for both, and one
	 * binary search serves all kinds. */
	uint64_t key;
	char *json; /* "name", quoted and escaped */
	size_t len;
};

struct enc_field {
	int kind;        /* enum enc_kind */
	uint32_t offset; /* from the start of the record */
	uint32_t size;
	char *key; /* ,"name":  escaped, with the comma and colon */
	size_t key_len;
	struct enc_enum *enums; /* sorted by key; NULL: no enum */
	size_t n_enums;
};

struct enc_schema {
	uint16_t type_id;
	uint32_t size;  /* header and fields: the shortest record it decodes */
	char *head;     /* ,"type":"NAME"  escaped */
	size_t head_len;
	char *name;     /* NAME escaped, without quotes, for error strings */
	size_t name_len;
	struct enc_field *fields;
	size_t n_fields;
	size_t bound;   /* most JSON bytes the fixed part can take */
};

/* Records turned into JSON, and how many went raw and why. */
struct enc_stats {
	uint64_t encoded;      /* every record */
	uint64_t decoded;      /* by a schema */
	uint64_t unframed;     /* raw: no header */
	uint64_t unknown_type; /* raw: framed, no schema of that type */
	uint64_t short_record; /* raw: framed, shorter than its schema */
	uint64_t json;         /* JSON objects (ENC_JSON_TYPE) */
	uint64_t text;         /* text lines (ENC_TEXT_TYPE) */
	uint64_t invalid_json; /* raw: ENC_JSON_TYPE, not a valid JSON object */
};

struct encoder {
	struct enc_schema *schemas;
	size_t n_schemas;
	/* type id -> 1 + index into schemas, 0: none. 128 KiB buys an O(1)
	 * lookup without hashing on every record. */
	uint16_t *by_type;
	char *buf; /* the last record's JSON */
	size_t cap;
	struct enc_stats stats;
};

/*
 * Two built-in types need no schema. Their records carry, after the header,
 * the record's type name and then the payload:
 *
 *   0        16     17          17+n
 *   +--------+------+-----------+----------------------------------
 *   | header | n u8 | name[n]   | payload ...
 *   +--------+------+-----------+----------------------------------
 *
 *   ENC_TEXT_TYPE  {"id":..,"ts_ns":..,"type":NAME|"text","line":"PAYLOAD"}
 *   ENC_JSON_TYPE  {"id":..,"ts_ns":..,"type":T,MEMBERS...}  (json.c)
 *
 * where T is the object's own "type" string, else NAME, else "json". An
 * object that does not parse is delivered raw with the reason and where.
 * Schemas cannot take these two type ids (service/schema.py refuses them).
 */
#define ENC_TEXT_TYPE 0xFFFEU
#define ENC_JSON_TYPE 0xFFFFU
#define ENC_JSON_MAX_DEPTH 128
#define ENC_XSTR(x) #x
#define ENC_STR(x) ENC_XSTR(x)

struct enc_json {
	const unsigned char *type; /* the object's "type" string token, or NULL */
	size_t type_len;
	const char *err; /* NULL: a valid object */
	size_t err_at;   /* byte offset into the payload where it failed */
};

/*
 * Check the JSON object s[0..n) and write its members to out, each with a
 * leading comma, without insignificant whitespace: "id", "ts_ns" and a
 * non-string "type" as "_id", "_ts_ns", "_type"; a string "type" into r.
 * out needs room for n + n / 6 + 2 bytes. Returns the end of what it wrote,
 * or NULL with r->err set.
 */
char *enc_json_members(char *out, const unsigned char *s, size_t n, struct enc_json *r);

/* Length of the valid UTF-8 sequence at s (2 to 4), or 0 with *bad set to
 * the length of its maximal invalid subpart. */
size_t enc_utf8_seq(const unsigned char *s, size_t n, size_t *bad);

/* Why a record was delivered raw (ENC_RAW_NONE: it was decoded). */
enum { ENC_RAW_NONE, ENC_RAW_UNFRAMED, ENC_RAW_UNKNOWN, ENC_RAW_SHORT };

/* What the caller hands on besides the JSON. */
struct enc_meta {
	uint64_t ts_ns;   /* the header's, or now_ns for a raw record */
	uint16_t type_id; /* 0 for a raw record */
};

/* 0, or -1 when out of memory; schemas and by_type are set up by the
 * caller (pyencoder.c) with enc_finish_schema() for each schema */
int enc_init(struct encoder *e, size_t n_schemas);
void enc_free(struct encoder *e);
/* compute s->bound once its fields are set */
void enc_finish_schema(struct enc_schema *s);

/* JSON-escaped copy of s[0..n) (valid UTF-8 expected, invalid bytes become
 * U+FFFD), wrapped as pre + escaped + post; malloc()ed, NUL-terminated,
 * its length in *len. NULL when out of memory. */
char *enc_escaped(const char *pre, const unsigned char *s, size_t n,
		  const char *post, size_t *len);

/*
 * Encode the record at pos into e->buf: returns its JSON's length, or -1
 * when out of memory. now_ns stamps records delivered raw.
 */
ssize_t enc_record(struct encoder *e, uint64_t pos, const unsigned char *data,
		   size_t len, uint64_t now_ns, struct enc_meta *meta);

/* Give back a buffer grown by an unusually large record. */
void enc_trim(struct encoder *e);

/* Write d as printf("%.17g") does, with ".0" appended when that reads as an
 * integer, or "null" for NaN and infinities; at most ENC_DOUBLE_MAX bytes.
 * Returns the end. */
#define ENC_DOUBLE_MAX 32
char *enc_put_double(char *p, double d);

#endif /* RINGCORE_ENCODE_H */
