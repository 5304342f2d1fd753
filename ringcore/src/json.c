/* SPDX-License-Identifier: MIT */
/*
 * JSON records (see encode.h): a strict RFC 8259 check of one object, copied
 * in the same pass without its insignificant whitespace, so that the object
 * can be spliced into the record's envelope:
 *
 *   payload  { "user": {"id": 7}, "type": "login", "id": 3 }
 *   members  ,"user":{"id":7},"_id":3          type -> r->type = "login"
 *   record   {"id":POS,"ts_ns":TS,"type":"login","user":{"id":7},"_id":3}
 *
 * Whitespace goes because a JSON text may hold newlines between tokens, and
 * one record must stay one NDJSON line and one SSE data: line. The envelope
 * owns "id" and "ts_ns", so the object's own members of those names are
 * delivered with a leading underscore; a "type" member that is a string
 * becomes the record's type, any other "type" is renamed the same way.
 *
 * Strings are copied as they are (escapes included) once checked: valid
 * UTF-8, no control characters, only JSON's escapes. Numbers are checked
 * against the grammar and copied as text, so none loses digits. Nesting is
 * bounded (ENC_JSON_MAX_DEPTH) to bound the recursion.
 */
#include <string.h>

#include "encode.h"

struct jp {
	const unsigned char *p, *end, *start;
	char *o;
	int depth;
	const char *err;
};

static int fail(struct jp *j, const char *why)
{
	if (!j->err)
		j->err = why;
	return -1;
}

static void skip_ws(struct jp *j)
{
	while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

static int hexval(unsigned c)
{
	if (c >= '0' && c <= '9')
		return (int)(c - '0');
	c |= 0x20;
	if (c >= 'a' && c <= 'f')
		return (int)(c - 'a' + 10);
	return -1;
}

/* A string token at j->p (its opening quote), copied to j->o when copy. */
static int string(struct jp *j, int copy)
{
	const unsigned char *s = j->p;

	j->p++;
	while (j->p < j->end) {
		unsigned c = *j->p;
		size_t bad;

		if (c == '"') {
			j->p++;
			if (copy) {
				memcpy(j->o, s, (size_t)(j->p - s));
				j->o += j->p - s;
			}
			return 0;
		}
		if (c < 0x20)
			return fail(j, "control character in a string");
		if (c == '\\') {
			if (j->end - j->p < 2)
				break;
			c = j->p[1];
			if (c == 'u') {
				if (j->end - j->p < 6)
					return fail(j, "short unicode escape");
				for (int k = 2; k < 6; k++)
					if (hexval(j->p[k]) < 0)
						return fail(j, "a unicode escape needs 4 hex digits");
				j->p += 6;
				continue;
			}
			if (!strchr("\"\\/bfnrt", (int)c) || !c)
				return fail(j, "invalid escape in a string");
			j->p += 2;
			continue;
		}
		if (c < 0x80) {
			j->p++;
			continue;
		}
		c = (unsigned)enc_utf8_seq(j->p, (size_t)(j->end - j->p), &bad);
		if (!c)
			return fail(j, "invalid UTF-8 in a string");
		j->p += c;
	}
	return fail(j, "unterminated string");
}

static void put(struct jp *j, const unsigned char *from)
{
	memcpy(j->o, from, (size_t)(j->p - from));
	j->o += j->p - from;
}

static int digits(struct jp *j)
{
	const unsigned char *d = j->p;

	while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
		j->p++;
	return j->p > d ? 0 : fail(j, "a number needs digits");
}

static int number(struct jp *j)
{
	const unsigned char *s = j->p;

	if (*j->p == '-')
		j->p++;
	if (j->p < j->end && *j->p == '0')
		j->p++; /* no leading zeros: "01" stops here and fails after */
	else if (digits(j))
		return -1;
	if (j->p < j->end && *j->p == '.') {
		j->p++;
		if (digits(j))
			return -1;
	}
	if (j->p < j->end && (*j->p | 0x20) == 'e') {
		j->p++;
		if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
			j->p++;
		if (digits(j))
			return -1;
	}
	put(j, s);
	return 0;
}

static int literal(struct jp *j, const char *word, size_t n)
{
	if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n))
		return fail(j, "expected a value");
	memcpy(j->o, word, n);
	j->o += n;
	j->p += n;
	return 0;
}

static int value(struct jp *j);

/* An array or object after its opening bracket; copies both brackets. */
static int container(struct jp *j, unsigned char close)
{
	if (++j->depth > ENC_JSON_MAX_DEPTH)
		return fail(j, "nested deeper than " ENC_STR(ENC_JSON_MAX_DEPTH) " levels");
	*j->o++ = (char)j->p[-1];
	skip_ws(j);
	if (j->p < j->end && *j->p == close) {
		j->p++;
		*j->o++ = (char)close;
		j->depth--;
		return 0;
	}
	for (;;) {
		if (close == '}') {
			skip_ws(j);
			if (j->p >= j->end || *j->p != '"')
				return fail(j, "expected a string key");
			if (string(j, 1))
				return -1;
			skip_ws(j);
			if (j->p >= j->end || *j->p != ':')
				return fail(j, "expected ':' after a key");
			j->p++;
			*j->o++ = ':';
		}
		if (value(j))
			return -1;
		skip_ws(j);
		if (j->p < j->end && *j->p == ',') {
			j->p++;
			*j->o++ = ',';
			continue;
		}
		if (j->p < j->end && *j->p == close) {
			j->p++;
			*j->o++ = (char)close;
			j->depth--;
			return 0;
		}
		return fail(j, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
	}
}

static int value(struct jp *j)
{
	skip_ws(j);
	if (j->p >= j->end)
		return fail(j, "expected a value");
	switch (*j->p) {
	case '"':
		return string(j, 1);
	case '{':
		j->p++;
		return container(j, '}');
	case '[':
		j->p++;
		return container(j, ']');
	case 't':
		return literal(j, "true", 4);
	case 'f':
		return literal(j, "false", 5);
	case 'n':
		return literal(j, "null", 4);
	default:
		if (*j->p == '-' || (*j->p >= '0' && *j->p <= '9'))
			return number(j);
		return fail(j, "expected a value");
	}
}

/*
 * Whether the key token k[0..n) (quotes included, checked) reads as word, an
 * ASCII word without escapes: "i\u0064" is "id" too.
 */
static int key_is(const unsigned char *k, size_t n, const char *word)
{
	size_t i = 1, w = 0;

	while (i < n - 1) {
		unsigned c = k[i];

		if (c == '\\') {
			if (k[i + 1] == 'u') {
				c = 0;
				for (int d = 2; d < 6; d++)
					c = c * 16 + (unsigned)hexval(k[i + d]);
				i += 6;
			} else {
				c = k[i + 1] == '/' || k[i + 1] == '"' || k[i + 1] == '\\' ? k[i + 1] : 0;
				i += 2;
			}
		} else {
			i++;
		}
		if (!word[w] || (unsigned char)word[w] != c)
			return 0;
		w++;
	}
	return !word[w];
}

char *enc_json_members(char *out, const unsigned char *s, size_t n, struct enc_json *r)
{
	struct jp j = {.p = s, .end = s + n, .start = s, .o = out};

	r->type = NULL;
	r->type_len = 0;
	r->err = NULL;
	skip_ws(&j);
	if (j.p >= j.end || *j.p != '{') {
		r->err = j.p >= j.end ? "empty: expected an object" : "not an object";
		r->err_at = (size_t)(j.p - s);
		return NULL;
	}
	j.p++;
	j.depth = 1;
	skip_ws(&j);
	if (j.p < j.end && *j.p == '}') {
		j.p++;
		goto end;
	}
	for (;;) {
		const unsigned char *key;
		size_t key_len;
		int is_string;

		skip_ws(&j);
		if (j.p >= j.end || *j.p != '"') {
			fail(&j, "expected a string key");
			goto bad;
		}
		key = j.p;
		if (string(&j, 0))
			goto bad;
		key_len = (size_t)(j.p - key);
		skip_ws(&j);
		if (j.p >= j.end || *j.p != ':') {
			fail(&j, "expected ':' after a key");
			goto bad;
		}
		j.p++;
		skip_ws(&j);
		is_string = j.p < j.end && *j.p == '"';
		if (is_string && key_is(key, key_len, "type")) {
			/* the record's type: its (last) string, not a member */
			r->type = j.p;
			if (string(&j, 0))
				goto bad;
			r->type_len = (size_t)(j.p - r->type);
		} else {
			*j.o++ = ',';
			if (key_is(key, key_len, "id") || key_is(key, key_len, "ts_ns") ||
			    key_is(key, key_len, "type")) {
				/* one byte more per member: enc_json_bound() */
				*j.o++ = '"';
				*j.o++ = '_';
				memcpy(j.o, key + 1, key_len - 1);
				j.o += key_len - 1;
			} else {
				memcpy(j.o, key, key_len);
				j.o += key_len;
			}
			*j.o++ = ':';
			if (value(&j))
				goto bad;
		}
		skip_ws(&j);
		if (j.p < j.end && *j.p == ',') {
			j.p++;
			continue;
		}
		if (j.p < j.end && *j.p == '}') {
			j.p++;
			break;
		}
		fail(&j, "expected ',' or '}'");
		goto bad;
	}
end:
	skip_ws(&j);
	if (j.p < j.end) {
		fail(&j, "data after the object");
		goto bad;
	}
	return j.o;
bad:
	r->err = j.err;
	r->err_at = (size_t)(j.p - s);
	return NULL;
}
