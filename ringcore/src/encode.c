/* SPDX-License-Identifier: MIT */
/*
 * Records to JSON by schema (see encode.h): the value writers and the walk
 * over one record. No Python here; pyencoder.c wraps it.
 *
 * Every writer below assumes the room for its output was reserved before
 * (the record's bound, see enc_finish_schema()), so none of them checks.
 */
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "encode.h"

/* --- little-endian loads -------------------------------------------------- */

/* Fields sit at any offset: memcpy is the defined way to read them
 * unaligned, and compiles to a plain load where that is allowed. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE16(v) __builtin_bswap16(v)
#define LE32(v) __builtin_bswap32(v)
#define LE64(v) __builtin_bswap64(v)
#else
#define LE16(v) (v)
#define LE32(v) (v)
#define LE64(v) (v)
#endif

static inline uint16_t ld16(const unsigned char *p)
{
	uint16_t v;

	memcpy(&v, p, sizeof(v));
	return LE16(v);
}

static inline uint32_t ld32(const unsigned char *p)
{
	uint32_t v;

	memcpy(&v, p, sizeof(v));
	return LE32(v);
}

static inline uint64_t ld64(const unsigned char *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
	return LE64(v);
}

/* --- numbers -------------------------------------------------------------- */

static const char digits2[201] =
	"0001020304050607080910111213141516171819"
	"2021222324252627282930313233343536373839"
	"4041424344454647484950515253545556575859"
	"6061626364656667686970717273747576777879"
	"8081828384858687888990919293949596979899";

/* Two digits per division: half the divisions of the textbook loop, and
 * division by a constant is a multiply. */
static char *put_u64(char *p, uint64_t v)
{
	char tmp[20], *t = tmp + sizeof(tmp);
	size_t n;

	while (v >= 100) {
		unsigned r = (unsigned)(v % 100);

		v /= 100;
		t -= 2;
		memcpy(t, digits2 + 2 * r, 2);
	}
	if (v >= 10) {
		t -= 2;
		memcpy(t, digits2 + 2 * v, 2);
	} else {
		*--t = (char)('0' + v);
	}
	n = (size_t)(tmp + sizeof(tmp) - t);
	memcpy(p, t, n);
	return p + n;
}

static char *put_i64(char *p, int64_t v)
{
	if (v < 0) {
		*p++ = '-';
		/* in unsigned arithmetic, so INT64_MIN negates too */
		return put_u64(p, 0 - (uint64_t)v);
	}
	return put_u64(p, (uint64_t)v);
}

#ifdef __SIZEOF_INT128__
static const uint64_t pow10_u64[20] = {
	1ULL,
	10ULL,
	100ULL,
	1000ULL,
	10000ULL,
	100000ULL,
	1000000ULL,
	10000000ULL,
	100000000ULL,
	1000000000ULL,
	10000000000ULL,
	100000000000ULL,
	1000000000000ULL,
	10000000000000ULL,
	100000000000000ULL,
	1000000000000000ULL,
	10000000000000000ULL,
	100000000000000000ULL,
	1000000000000000000ULL,
	10000000000000000000ULL,
};

#define E16 10000000000000000ULL
#define E17 100000000000000000ULL

/* floor(e2 * log10(2)) for |e2| < 2^13; 78913 / 2^18 is log10(2) to 6
 * digits, and digits17() corrects an estimate that is one off anyway. Kept
 * clear of shifting negative numbers, which C leaves to the compiler. */
static int floor_log10_pow2(int e2)
{
	if (e2 >= 0)
		return (e2 * 78913) >> 18;
	return -((-e2 * 78913 + (1 << 18) - 1) >> 18);
}

/*
 * The 17 significant digits of v = m * 2^e, correctly rounded (ties to
 * even, as printf), as q in [1e16, 1e17) and the decimal exponent x of its
 * first digit. glibc's printf("%.17g") takes ~280 ns for an arbitrary
 * double, more than the rest of a 64-byte record's JSON together; this
 * computes the same digits exactly with one 128-bit product whenever
 * m * 10^k fits in 128 bits, which covers |v| from about 1e-6 to 2^64.
 * Returns 0 outside that range (the caller uses snprintf there).
 */
static int digits17(uint64_t m, int e, uint64_t *qout, int *xout)
{
	uint64_t mm, q;
	int s, x, k, tries, up;

	if (e > 11)
		return 0; /* m << e would not fit in 64 bits */
	if (e >= 0) {
		mm = m << e;
		s = 0;
	} else {
		mm = m;
		s = -e;
	}
	x = floor_log10_pow2(63 - __builtin_clzll(mm) - s);
	for (tries = 0; tries < 4; tries++) {
		k = 16 - x;
		/* v * 10^k must be about 1e16: for k > 22 m * 10^k may not
		 * fit in 128 bits, and k < -3 would need v >= 1e20 */
		if (k > 22 || k < -3 || s > 127)
			return 0;
		if (k >= 0) {
			/* exact: v * 10^k = n / 2^s */
			unsigned __int128 n = (unsigned __int128)mm *
					      pow10_u64[k > 19 ? 19 : k];
			unsigned __int128 rem, half;

			if (k > 19)
				n *= pow10_u64[k - 19];
			if ((n >> s) >> 64)
				return 0; /* the estimate of x was far off */
			q = (uint64_t)(n >> s);
			rem = n & (((unsigned __int128)1 << s) - 1);
			half = s ? (unsigned __int128)1 << (s - 1) : 0;
			up = s && (rem > half || (rem == half && (q & 1)));
		} else {
			/* v is an integer of 18 to 20 digits */
			uint64_t dv = pow10_u64[-k], r;

			q = mm / dv;
			r = mm % dv;
			up = r > dv - r || (r == dv - r && (q & 1));
		}
		if (q >= E17) {
			x++;
			continue;
		}
		if (q < E16) {
			x--;
			continue;
		}
		q += (uint64_t)up;
		if (q == E17) { /* 99999999999999999.5 rounds to 1e17 */
			q = E16;
			x++;
		}
		*qout = q;
		*xout = x;
		return 1;
	}
	return 0;
}

/* q's 17 digits laid out as %.17g lays them out for exponent x */
static char *put_digits17(char *p, uint64_t q, int x)
{
	char dig[18];
	int nd = 17, i;

	for (i = 15; i >= 1; i -= 2) {
		memcpy(dig + i, digits2 + 2 * (q % 100), 2);
		q /= 100;
	}
	dig[0] = (char)('0' + q);
	/* %g drops trailing zeros (and the point, when nothing is left) */
	while (nd > 1 && dig[nd - 1] == '0')
		nd--;
	if (x < -4 || x >= 17) {
		*p++ = dig[0];
		if (nd > 1) {
			*p++ = '.';
			memcpy(p, dig + 1, (size_t)nd - 1);
			p += nd - 1;
		}
		*p++ = 'e';
		*p++ = x < 0 ? '-' : '+';
		if (x < 0)
			x = -x;
		if (x < 10)
			*p++ = '0'; /* at least two exponent digits */
		return put_u64(p, (uint64_t)x);
	}
	if (x < 0) {
		*p++ = '0';
		*p++ = '.';
		memset(p, '0', (size_t)(-x - 1));
		p += -x - 1;
		memcpy(p, dig, (size_t)nd);
		return p + nd;
	}
	/* the digits past nd are the zeros %g dropped */
	memcpy(p, dig, (size_t)x + 1);
	p += x + 1;
	*p++ = '.';
	if (nd <= x + 1) {
		*p++ = '0'; /* an integral value still reads as a float */
		return p;
	}
	memcpy(p, dig + x + 1, (size_t)(nd - x - 1));
	return p + nd - x - 1;
}
#endif /* __SIZEOF_INT128__ */

/*
 * 17 digits always read back as the same double, but most doubles (those
 * that came from a decimal of 15 digits or fewer, such as 0.021) have a
 * shorter text that also does: 0.021 rather than 0.021000000000000001. Try
 * 15 and 16 digits first, keeping the first that strtod() reads back
 * exactly; trailing zeros then go, so 0.5 stays "0.5". The result may be a
 * digit longer than the very shortest (Python's repr searches all texts of
 * 16 digits, this tries the nearest one), never wrong.
 */
static int reads_back(const char *text, size_t len, double v)
{
	char buf[ENC_DOUBLE_MAX];

	memcpy(buf, text, len);
	buf[len] = 0;
	return strtod(buf, NULL) == v;
}

#ifdef __SIZEOF_INT128__
static char *put_shortest(char *p, uint64_t q, int x, double v)
{
	for (int nd = 15; nd <= 16; nd++) {
		/* A normal double is within half an ulp (< 11.2 units of q's
		 * last digit, q < 1e17) of any text that reads back as it. A
		 * 15-digit text is a multiple of 100 in those units, so when q
		 * is far from one, skip the strtod() that would say no: most
		 * doubles that did not come from a short decimal end here. */
		if (nd == 15 && v >= DBL_MIN && q % 100 > 15 && q % 100 < 85)
			continue;
		uint64_t div = pow10_u64[17 - nd], r = q % div, t = q / div;
		uint64_t half = div / 2;
		int xx = x;
		char *end;

		/* round to nd digits, ties to even */
		if (r > half || (r == half && (t & 1)))
			t++;
		if (t == pow10_u64[nd]) { /* 9.99..95 became 10.0 */
			t = pow10_u64[nd - 1];
			xx++;
		}
		end = put_digits17(p, t * div, xx);
		if (reads_back(p, (size_t)(end - p), v))
			return end;
	}
	return put_digits17(p, q, x);
}
#endif

/* outside the fast path's range: printf, shortest of 15-17 digits that
 * reads back */
static int snprintf_shortest(char *p, double v)
{
	int n = 0;

	for (int nd = 15; nd <= 17; nd++) {
		n = snprintf(p, ENC_DOUBLE_MAX - 1, "%.*g", nd, v);
		if (reads_back(p, (size_t)n, v))
			break;
	}
	return n;
}

char *enc_put_double(char *p, double d)
{
	uint64_t bits, m;
	int exp;
	char *start;

	memcpy(&bits, &d, sizeof(bits));
	exp = (int)((bits >> 52) & 0x7ff);
	m = bits & ((1ULL << 52) - 1);
	if (exp == 0x7ff) { /* JSON has no NaN or infinity */
		memcpy(p, "null", 4);
		return p + 4;
	}
	if (bits >> 63)
		*p++ = '-';
	if (!exp && !m) {
		memcpy(p, "0.0", 3);
		return p + 3;
	}
#ifdef __SIZEOF_INT128__
	{
		uint64_t q;
		int x;

		if (exp)
			m |= 1ULL << 52;
		if (digits17(m, exp ? exp - 1075 : -1074, &q, &x))
			return put_shortest(p, q, x, d < 0 ? -d : d);
	}
#endif
	start = p;
	p += snprintf_shortest(p, d < 0 ? -d : d);
	if (!memchr(start, '.', (size_t)(p - start)) &&
	    !memchr(start, 'e', (size_t)(p - start))) {
		memcpy(p, ".0", 2);
		p += 2;
	}
	return p;
}

/* --- strings -------------------------------------------------------------- */

enum { STR_PLAIN = 0, STR_ESCAPE = 1, STR_HIGH = 2 };

/* What to do with each byte: most text is plain ASCII, copied in runs */
static const unsigned char str_class[256] = {
	[0x00 ... 0x1f] = STR_ESCAPE,
	['"'] = STR_ESCAPE,
	['\\'] = STR_ESCAPE,
	[0x80 ... 0xff] = STR_HIGH,
};

static const char hexdig[] = "0123456789abcdef";

/*
 * Length of the valid UTF-8 sequence at s (2 to 4), or 0 with *bad set to
 * the length of its maximal invalid subpart: the longest prefix that could
 * start a valid sequence. One U+FFFD replaces each such subpart, which is
 * what Python's bytes.decode("utf-8", "replace") does (Unicode's
 * "substitution of maximal subparts"). The ranges of the second byte shut
 * out overlong forms (E0, F0), surrogates (ED) and code points past
 * U+10FFFF (F4).
 */
size_t enc_utf8_seq(const unsigned char *s, size_t n, size_t *bad)
{
	unsigned c = s[0], lo = 0x80, hi = 0xbf;
	size_t need, k;

	if (c < 0xc2 || c > 0xf4) {
		*bad = 1;
		return 0;
	}
	if (c < 0xe0) {
		need = 1;
	} else if (c < 0xf0) {
		need = 2;
		if (c == 0xe0)
			lo = 0xa0;
		else if (c == 0xed)
			hi = 0x9f;
	} else {
		need = 3;
		if (c == 0xf0)
			lo = 0x90;
		else if (c == 0xf4)
			hi = 0x8f;
	}
	for (k = 1; k <= need; k++) {
		if (k >= n || s[k] < lo || s[k] > hi) {
			*bad = k;
			return 0;
		}
		lo = 0x80;
		hi = 0xbf;
	}
	return need + 1;
}

/* s[0..n) as the inside of a JSON string: at most 6 bytes per byte */
static char *put_text(char *p, const unsigned char *s, size_t n)
{
	size_t i = 0;

	while (i < n) {
		size_t start = i, len, bad;
		unsigned c;

		while (i < n && str_class[s[i]] == STR_PLAIN)
			i++;
		memcpy(p, s + start, i - start);
		p += i - start;
		if (i == n)
			break;
		c = s[i];
		if (c < 0x80) {
			*p++ = '\\';
			switch (c) {
			case '"':
			case '\\':
				*p++ = (char)c;
				break;
			case '\b':
				*p++ = 'b';
				break;
			case '\f':
				*p++ = 'f';
				break;
			case '\n':
				*p++ = 'n';
				break;
			case '\r':
				*p++ = 'r';
				break;
			case '\t':
				*p++ = 't';
				break;
			default:
				memcpy(p, "u00", 3);
				p[3] = hexdig[c >> 4];
				p[4] = hexdig[c & 15];
				p += 5;
			}
			i++;
			continue;
		}
		len = enc_utf8_seq(s + i, n - i, &bad);
		if (len) {
			memcpy(p, s + i, len);
			p += len;
			i += len;
		} else {
			memcpy(p, "\xef\xbf\xbd", 3); /* U+FFFD */
			p += 3;
			i += bad;
		}
	}
	return p;
}

static char *put_hex(char *p, const unsigned char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		*p++ = hexdig[s[i] >> 4];
		*p++ = hexdig[s[i] & 15];
	}
	return p;
}

static const char b64dig[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static inline uint64_t b64_len(uint64_t n)
{
	return (n + 2) / 3 * 4;
}

static char *put_b64(char *p, const unsigned char *s, size_t n)
{
	size_t i = 0;
	uint32_t v;

	for (; n - i >= 3; i += 3) {
		v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
		p[0] = b64dig[v >> 18];
		p[1] = b64dig[(v >> 12) & 63];
		p[2] = b64dig[(v >> 6) & 63];
		p[3] = b64dig[v & 63];
		p += 4;
	}
	if (n - i == 1) {
		v = (uint32_t)s[i] << 16;
		p[0] = b64dig[v >> 18];
		p[1] = b64dig[(v >> 12) & 63];
		p[2] = p[3] = '=';
		p += 4;
	} else if (n - i == 2) {
		v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8;
		p[0] = b64dig[v >> 18];
		p[1] = b64dig[(v >> 12) & 63];
		p[2] = b64dig[(v >> 6) & 63];
		p[3] = '=';
		p += 4;
	}
	return p;
}

#define PUT_LIT(p, s) (memcpy((p), (s), sizeof(s) - 1), (p) + sizeof(s) - 1)

char *enc_escaped(const char *pre, const unsigned char *s, size_t n,
		  const char *post, size_t *len)
{
	size_t a = strlen(pre), b = strlen(post);
	char *out = malloc(a + 6 * n + b + 1), *p;

	if (!out)
		return NULL;
	memcpy(out, pre, a);
	p = put_text(out + a, s, n);
	memcpy(p, post, b);
	p += b;
	*p = '\0';
	*len = (size_t)(p - out);
	return out;
}

/* --- schemas and the encoder ---------------------------------------------- */

/* {"id":N,"ts_ns":N and the closing brace, numbers at their longest */
#define ENVELOPE_BOUND (sizeof("{\"id\":,\"ts_ns\":}") + 2 * 20)
#define EXTRA_KEY ",\"_extra\":\""

void enc_finish_schema(struct enc_schema *s)
{
	uint64_t b = ENVELOPE_BOUND + s->head_len + sizeof(EXTRA_KEY) + 1;

	for (size_t i = 0; i < s->n_fields; i++) {
		const struct enc_field *f = &s->fields[i];
		uint64_t v;

		switch (f->kind) {
		case ENC_PAD:
			continue;
		case ENC_F32:
		case ENC_F64:
			v = ENC_DOUBLE_MAX;
			break;
		case ENC_CHAR:
			v = 2 + 6 * (uint64_t)f->size;
			break;
		case ENC_HEX:
			v = 2 + 2 * (uint64_t)f->size;
			break;
		case ENC_BASE64:
			v = 2 + b64_len(f->size);
			break;
		default: /* integers: 20 characters hold any 64-bit one */
			v = 20;
			for (size_t j = 0; j < f->n_enums; j++)
				if (f->enums[j].len > v)
					v = f->enums[j].len;
		}
		b += f->key_len + v;
	}
	s->bound = b;
}

int enc_init(struct encoder *e, size_t n_schemas)
{
	memset(e, 0, sizeof(*e));
	e->by_type = calloc(1 << 16, sizeof(*e->by_type));
	e->schemas = calloc(n_schemas ? n_schemas : 1, sizeof(*e->schemas));
	if (!e->by_type || !e->schemas) {
		enc_free(e);
		return -1;
	}
	e->n_schemas = n_schemas;
	return 0;
}

void enc_free(struct encoder *e)
{
	for (size_t i = 0; e->schemas && i < e->n_schemas; i++) {
		struct enc_schema *s = &e->schemas[i];

		for (size_t j = 0; s->fields && j < s->n_fields; j++) {
			struct enc_field *f = &s->fields[j];

			for (size_t k = 0; k < f->n_enums; k++)
				free(f->enums[k].json);
			free(f->enums);
			free(f->key);
		}
		free(s->fields);
		free(s->head);
		free(s->name);
	}
	free(e->schemas);
	free(e->by_type);
	free(e->buf);
	memset(e, 0, sizeof(*e));
}

/* The buffer stays as large as the largest record so far: records of a
 * ring are much alike, so it settles after the first few. */
static int reserve(struct encoder *e, uint64_t need)
{
	size_t cap;
	char *p;

	if (need <= e->cap)
		return 0;
	if (need > SIZE_MAX / 2)
		return -1;
	cap = e->cap ? e->cap : 4096;
	while (cap < need)
		cap *= 2;
	p = realloc(e->buf, cap);
	if (!p)
		return -1;
	e->buf = p;
	e->cap = cap;
	return 0;
}

void enc_trim(struct encoder *e)
{
	/* one huge raw record should not pin its buffer for good */
	if (e->cap > (4U << 20)) {
		free(e->buf);
		e->buf = NULL;
		e->cap = 0;
	}
}

static const struct enc_enum *find_enum(const struct enc_field *f,
					uint64_t key)
{
	size_t lo = 0, hi = f->n_enums;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (f->enums[mid].key < key)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < f->n_enums && f->enums[lo].key == key ? &f->enums[lo]
							  : NULL;
}

static char *put_uint_field(char *p, const struct enc_field *f, uint64_t v)
{
	const struct enc_enum *en = f->enums ? find_enum(f, v) : NULL;

	if (en) {
		memcpy(p, en->json, en->len);
		return p + en->len;
	}
	return put_u64(p, v);
}

static char *put_int_field(char *p, const struct enc_field *f, int64_t v)
{
	const struct enc_enum *en =
		f->enums ? find_enum(f, (uint64_t)v ^ (1ULL << 63)) : NULL;

	if (en) {
		memcpy(p, en->json, en->len);
		return p + en->len;
	}
	return put_i64(p, v);
}

static char *put_field(char *p, const struct enc_field *f,
		       const unsigned char *d)
{
	const unsigned char *at = d + f->offset;
	const unsigned char *nul;
	float f32;
	double f64;
	uint32_t u32;
	uint64_t u64;
	int8_t i8;
	int16_t i16;
	int32_t i32;
	int64_t i64;
	uint16_t u16;

	memcpy(p, f->key, f->key_len);
	p += f->key_len;
	/* Signed values go through memcpy from their unsigned load: the
	 * conversion itself would be implementation-defined. */
	switch (f->kind) {
	case ENC_U8:
		return put_uint_field(p, f, at[0]);
	case ENC_U16:
		return put_uint_field(p, f, ld16(at));
	case ENC_U32:
		return put_uint_field(p, f, ld32(at));
	case ENC_U64:
		return put_uint_field(p, f, ld64(at));
	case ENC_I8:
		memcpy(&i8, at, 1);
		return put_int_field(p, f, i8);
	case ENC_I16:
		u16 = ld16(at);
		memcpy(&i16, &u16, 2);
		return put_int_field(p, f, i16);
	case ENC_I32:
		u32 = ld32(at);
		memcpy(&i32, &u32, 4);
		return put_int_field(p, f, i32);
	case ENC_I64:
		u64 = ld64(at);
		memcpy(&i64, &u64, 8);
		return put_int_field(p, f, i64);
	case ENC_F32:
		u32 = ld32(at);
		memcpy(&f32, &u32, 4);
		return enc_put_double(p, (double)f32);
	case ENC_F64:
		u64 = ld64(at);
		memcpy(&f64, &u64, 8);
		return enc_put_double(p, f64);
	case ENC_CHAR:
		nul = memchr(at, 0, f->size);
		*p++ = '"';
		p = put_text(p, at, nul ? (size_t)(nul - at) : f->size);
		*p++ = '"';
		return p;
	case ENC_HEX:
		*p++ = '"';
		p = put_hex(p, at, f->size);
		*p++ = '"';
		return p;
	case ENC_BASE64:
		*p++ = '"';
		p = put_b64(p, at, f->size);
		*p++ = '"';
		return p;
	}
	return p;
}

/* service/schema.py's UNFRAMED and UNKNOWN_TYPE, word for word */
#define ENC_UNFRAMED "unframed: no RS record header"
#define ENC_UNKNOWN_TYPE "unknown type: no schema has this type_id"

/* why: the error, when neither unframed, unknown nor short says it */
static ssize_t put_raw(struct encoder *e, uint64_t pos,
		       const unsigned char *d, size_t len, uint64_t now_ns,
		       unsigned type_id, const struct enc_schema *s,
		       const char *why)
{
	/* the longest envelope: every key, every number at 20 digits */
	uint64_t need = 256 + (s ? s->name_len : 0) + b64_len(len) +
			(why ? 6 * strlen(why) : 0);
	char *p;

	if (reserve(e, need))
		return -1;
	p = e->buf;
	p = PUT_LIT(p, "{\"id\":");
	p = put_u64(p, pos);
	p = PUT_LIT(p, ",\"ts_ns\":");
	p = put_u64(p, now_ns);
	p = PUT_LIT(p, ",\"type\":\"raw\"");
	if (type_id) {
		p = PUT_LIT(p, ",\"type_id\":");
		p = put_u64(p, type_id);
	}
	if (why) {
		p = PUT_LIT(p, ",\"error\":\"");
		p = put_text(p, (const unsigned char *)why, strlen(why));
		*p++ = '"';
	} else if (!type_id) {
		p = PUT_LIT(p, ",\"error\":\"" ENC_UNFRAMED "\"");
	} else if (!s) {
		p = PUT_LIT(p, ",\"error\":\"" ENC_UNKNOWN_TYPE "\"");
	} else {
		p = PUT_LIT(p, ",\"error\":\"short record: ");
		p = put_u64(p, len);
		p = PUT_LIT(p, " bytes, schema ");
		memcpy(p, s->name, s->name_len);
		p += s->name_len;
		p = PUT_LIT(p, " needs ");
		p = put_u64(p, s->size);
		*p++ = '"';
	}
	p = PUT_LIT(p, ",\"raw\":\"");
	p = put_b64(p, d, len);
	p = PUT_LIT(p, "\"}");
	return p - e->buf;
}

/* ENC_TEXT_TYPE and ENC_JSON_TYPE records (encode.h has their layout) */
static ssize_t put_builtin(struct encoder *e, uint64_t pos,
			   const unsigned char *d, size_t len, uint64_t now_ns,
			   unsigned type_id, struct enc_meta *meta)
{
	const unsigned char *name = d + ENC_HEADER_SZ + 1, *body;
	size_t name_len, body_len;
	uint64_t need, head;
	char *p, *members, *end;
	struct enc_json r;
	char why[96];

	if (len < ENC_HEADER_SZ + 1 || len < ENC_HEADER_SZ + 1U + d[ENC_HEADER_SZ]) {
		e->stats.short_record++;
		return put_raw(e, pos, d, len, now_ns, type_id, NULL,
			       "short record: its type name runs past the end");
	}
	name_len = d[ENC_HEADER_SZ];
	body = name + name_len;
	body_len = len - ENC_HEADER_SZ - 1 - name_len;
	/* the envelope with every number at 20 digits and the longest type:
	 * the escaped name, or the object's own type (at most the payload) */
	head = 80 + 6 * (uint64_t)name_len + body_len;
	need = head + (type_id == ENC_TEXT_TYPE ? 6 * (uint64_t)body_len
						: body_len + body_len / 6 + 2);
	if (reserve(e, need + 16))
		return -1;
	p = e->buf;
	if (type_id == ENC_JSON_TYPE) {
		members = e->buf + head;
		end = enc_json_members(members, body, body_len, &r);
		if (!end) {
			e->stats.invalid_json++;
			snprintf(why, sizeof(why), "invalid JSON at byte %zu: %s", r.err_at, r.err);
			return put_raw(e, pos, d, len, now_ns, type_id, NULL, why);
		}
	}
	meta->ts_ns = ld64(d + 8);
	meta->type_id = (uint16_t)type_id;
	p = PUT_LIT(p, "{\"id\":");
	p = put_u64(p, pos);
	p = PUT_LIT(p, ",\"ts_ns\":");
	p = put_u64(p, meta->ts_ns);
	p = PUT_LIT(p, ",\"type\":");
	if (type_id == ENC_JSON_TYPE && r.type) {
		memcpy(p, r.type, r.type_len);
		p += r.type_len;
	} else if (name_len) {
		*p++ = '"';
		p = put_text(p, name, name_len);
		*p++ = '"';
	} else if (type_id == ENC_JSON_TYPE) {
		p = PUT_LIT(p, "\"json\"");
	} else {
		p = PUT_LIT(p, "\"text\"");
	}
	if (type_id == ENC_TEXT_TYPE) {
		e->stats.text++;
		p = PUT_LIT(p, ",\"line\":\"");
		p = put_text(p, body, body_len);
		p = PUT_LIT(p, "\"}");
		return p - e->buf;
	}
	e->stats.json++;
	memmove(p, members, (size_t)(end - members));
	p += end - members;
	*p++ = '}';
	return p - e->buf;
}

ssize_t enc_record(struct encoder *e, uint64_t pos, const unsigned char *d,
		   size_t len, uint64_t now_ns, struct enc_meta *meta)
{
	const struct enc_schema *s;
	unsigned type_id = 0;
	uint64_t ts;
	char *p;

	e->stats.encoded++;
	meta->ts_ns = now_ns;
	meta->type_id = 0;
	/* as service/record.py's parse_header(): type 0 is never framed */
	if (len < ENC_HEADER_SZ || d[0] != 'R' || d[1] != 'S' || ld32(d + 4) ||
	    !(type_id = ld16(d + 2))) {
		e->stats.unframed++;
		return put_raw(e, pos, d, len, now_ns, 0, NULL, NULL);
	}
	if (!e->by_type[type_id]) {
		if (type_id >= ENC_TEXT_TYPE)
			return put_builtin(e, pos, d, len, now_ns, type_id, meta);
		e->stats.unknown_type++;
		return put_raw(e, pos, d, len, now_ns, type_id, NULL, NULL);
	}
	s = &e->schemas[e->by_type[type_id] - 1];
	if (len < s->size) {
		e->stats.short_record++;
		return put_raw(e, pos, d, len, now_ns, type_id, s, NULL);
	}
	if (reserve(e, s->bound + b64_len(len - s->size)))
		return -1;
	e->stats.decoded++;
	ts = ld64(d + 8);
	meta->ts_ns = ts;
	meta->type_id = (uint16_t)type_id;
	p = e->buf;
	p = PUT_LIT(p, "{\"id\":");
	p = put_u64(p, pos);
	p = PUT_LIT(p, ",\"ts_ns\":");
	p = put_u64(p, ts);
	memcpy(p, s->head, s->head_len);
	p += s->head_len;
	for (size_t i = 0; i < s->n_fields; i++)
		if (s->fields[i].kind != ENC_PAD)
			p = put_field(p, &s->fields[i], d);
	if (len > s->size) {
		p = PUT_LIT(p, EXTRA_KEY);
		p = put_b64(p, d + s->size, len - s->size);
		*p++ = '"';
	}
	*p++ = '}';
	return p - e->buf;
}
