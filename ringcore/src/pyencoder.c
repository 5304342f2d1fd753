/* SPDX-License-Identifier: MIT */
/*
 * The Encoder type: records to JSON lines by schema (encode.c), either
 * straight from a consumer Ring's memory or from bytes.
 *
 * Encoder.consume() encodes each record inside rc_consume(), while it is
 * still in the ring: no bytes object for the record, no Python call per
 * record. That is what makes ~10x the rate of struct + dict + orjson.
 */
#include <limits.h>
#include <stdarg.h>
#include <time.h>

#include "encode.h"
#include "pyringcore.h"

#define FASTCALL_KW(fn) ((PyCFunction)(void (*)(void))(fn))

typedef struct {
	PyObject_HEAD
	struct encoder enc;
	/* inside a call that uses enc.buf: a finalizer that runs during one
	 * (on an allocation) must not encode into the same buffer */
	int busy;
} EncoderObject;

/* --- building from the schema description ---------------------------------- */

static const struct {
	const char *name;
	int kind;
	uint32_t size; /* 0: given by the schema */
} kinds[] = {
	{"u8", ENC_U8, 1},    {"u16", ENC_U16, 2}, {"u32", ENC_U32, 4},
	{"u64", ENC_U64, 8},  {"i8", ENC_I8, 1},   {"i16", ENC_I16, 2},
	{"i32", ENC_I32, 4},  {"i64", ENC_I64, 8}, {"f32", ENC_F32, 4},
	{"f64", ENC_F64, 8},  {"char", ENC_CHAR, 0}, {"bytes", ENC_HEX, 0},
	{"pad", ENC_PAD, 0},
};
#define N_KINDS (sizeof(kinds) / sizeof(kinds[0]))
#define KIND_LIST "u8, u16, u32, u64, i8, i16, i32, i64, f32, f64, char, bytes, pad"

/* the JSON envelope's keys: a field of the same name would collide */
static const char *const reserved[] = {"id",  "ts_ns", "type",   "type_id",
				       "error", "raw", "_extra", NULL};

static int is_int_kind(int kind)
{
	return kind <= ENC_I64;
}

static int is_signed_kind(int kind)
{
	return kind >= ENC_I8 && kind <= ENC_I64;
}

/* Raise exc as "Encoder(): WHERE: message". Returns -1. */
static int fail(PyObject *exc, PyObject *where, const char *fmt, ...)
{
	PyObject *msg;
	va_list va;

	va_start(va, fmt);
	msg = PyUnicode_FromFormatV(fmt, va);
	va_end(va);
	if (msg) {
		PyErr_Format(exc, "Encoder(): %U: %U", where, msg);
		Py_DECREF(msg);
	}
	return -1;
}

/* An int (not a bool) in [lo, hi]: 0; else -1 with *out_of_range telling
 * which way it failed (no exception set). */
static int get_int(PyObject *o, long long lo, long long hi, long long *out,
		   int *out_of_range)
{
	int overflow;

	*out_of_range = 0;
	if (!PyLong_Check(o) || PyBool_Check(o))
		return -1;
	*out = PyLong_AsLongLongAndOverflow(o, &overflow);
	if (*out == -1 && PyErr_Occurred()) {
		PyErr_Clear();
		return -1;
	}
	if (overflow || *out < lo || *out > hi) {
		*out_of_range = 1;
		return -1;
	}
	return 0;
}

/* The UTF-8 of a non-empty str, or NULL with an exception set */
static const char *get_name(PyObject *o, PyObject *where, const char *what,
			    Py_ssize_t *len)
{
	const char *s;

	if (!PyUnicode_Check(o) || PyUnicode_GET_LENGTH(o) == 0) {
		fail(PyExc_TypeError, where, "%s must be a non-empty str, not %R",
		     what, o);
		return NULL;
	}
	s = PyUnicode_AsUTF8AndSize(o, len);
	if (!s)
		fail(PyExc_ValueError, where, "%s %R is not encodable as UTF-8",
		     what, o);
	return s;
}

static int cmp_enum(const void *a, const void *b)
{
	uint64_t x = ((const struct enc_enum *)a)->key;
	uint64_t y = ((const struct enc_enum *)b)->key;

	return (x > y) - (x < y);
}

static int parse_enum(struct enc_field *f, PyObject *dict, PyObject *where,
		      const char *kind)
{
	PyObject *k, *v;
	Py_ssize_t i = 0, n;
	unsigned bits;
	int sgn;

	if (!is_int_kind(f->kind))
		return fail(PyExc_ValueError, where,
			    "only integer fields take an enum, this one is %s",
			    kind);
	/* the range of the field's kind, for the keys (u8..i64 lead kinds[]) */
	bits = (unsigned)kinds[f->kind].size * 8;
	sgn = is_signed_kind(f->kind);
	if (!PyDict_Check(dict))
		return fail(PyExc_TypeError, where,
			    "enum must be a dict of int -> str or None, not %R",
			    dict);
	n = PyDict_GET_SIZE(dict);
	f->enums = calloc(n ? (size_t)n : 1, sizeof(*f->enums));
	if (!f->enums) {
		PyErr_NoMemory();
		return -1;
	}
	while (PyDict_Next(dict, &i, &k, &v)) {
		struct enc_enum *en = &f->enums[f->n_enums];
		const char *name;
		Py_ssize_t len;
		int overflow = 0;

		if (!PyLong_Check(k) || PyBool_Check(k))
			return fail(PyExc_TypeError, where,
				    "enum key %R is not an int", k);
		if (sgn) {
			long long x = PyLong_AsLongLongAndOverflow(k, &overflow);
			long long lo = bits == 64 ? LLONG_MIN : -(1LL << (bits - 1));
			long long hi = bits == 64 ? LLONG_MAX
						  : (1LL << (bits - 1)) - 1;

			if (x == -1 && PyErr_Occurred())
				return -1;
			if (overflow || x < lo || x > hi)
				return fail(PyExc_ValueError, where,
					    "enum key %R is out of range for %s",
					    k, kind);
			en->key = (uint64_t)x ^ (1ULL << 63);
		} else {
			unsigned long long x = PyLong_AsUnsignedLongLong(k);

			if (x == (unsigned long long)-1 && PyErr_Occurred()) {
				PyErr_Clear();
				overflow = 1;
			}
			if (overflow || (bits < 64 && x >> bits))
				return fail(PyExc_ValueError, where,
					    "enum key %R is out of range for %s",
					    k, kind);
			en->key = x;
		}
		name = get_name(v, where, "enum name", &len);
		if (!name)
			return -1;
		en->json = enc_escaped("\"", (const unsigned char *)name,
				       (size_t)len, "\"", &en->len);
		if (!en->json) {
			PyErr_NoMemory();
			return -1;
		}
		f->n_enums++;
	}
	qsort(f->enums, f->n_enums, sizeof(*f->enums), cmp_enum);
	return 0;
}

/*
 * One (name, kind, offset, size, encoding, enum) tuple into f. *end is where
 * the previous field ended; fields must come in order and not overlap.
 * names holds the names seen so far in this schema.
 */
static int parse_field(struct enc_field *f, PyObject *item, PyObject *where,
		       PyObject *names, uint32_t *end)
{
	PyObject *seq, **it;
	const char *name, *kind, *encoding;
	Py_ssize_t name_len, i;
	long long offset, size;
	int range, rc = -1;
	size_t k;

	seq = PySequence_Fast(item, "");
	if (!seq || PySequence_Fast_GET_SIZE(seq) != 6) {
		PyErr_Clear();
		fail(PyExc_TypeError, where,
		     "a field must be a (name, kind, offset, size, encoding, "
		     "enum) tuple, not %R",
		     item);
		goto out;
	}
	it = PySequence_Fast_ITEMS(seq);
	name = get_name(it[0], where, "the field name", &name_len);
	if (!name)
		goto out;
	if (!PyUnicode_Check(it[1])) {
		fail(PyExc_TypeError, where, "kind must be a str, not %R", it[1]);
		goto out;
	}
	kind = PyUnicode_AsUTF8(it[1]);
	if (!kind)
		goto out;
	for (k = 0; k < N_KINDS; k++)
		if (!strcmp(kind, kinds[k].name))
			break;
	if (k == N_KINDS) {
		fail(PyExc_ValueError, where,
		     "unknown kind %R (expected one of " KIND_LIST ")", it[1]);
		goto out;
	}
	f->kind = kinds[k].kind;
	if (f->kind != ENC_PAD) {
		/* pads never reach the JSON: only the others' names matter */
		for (i = 0; reserved[i]; i++)
			if ((size_t)name_len == strlen(reserved[i]) &&
			    !memcmp(name, reserved[i], (size_t)name_len)) {
				fail(PyExc_ValueError, where,
				     "field name %R is reserved for the record "
				     "envelope",
				     it[0]);
				goto out;
			}
		switch (PySet_Contains(names, it[0])) {
		case 1:
			fail(PyExc_ValueError, where, "duplicate field name %R",
			     it[0]);
			goto out;
		case -1:
			goto out;
		}
		if (PySet_Add(names, it[0]))
			goto out;
	}
	if (get_int(it[2], ENC_HEADER_SZ, ENC_MAX_RECORD_SZ, &offset, &range)) {
		fail(range ? PyExc_ValueError : PyExc_TypeError, where,
		     "offset must be an int from %u (past the header) to %u, "
		     "not %R",
		     ENC_HEADER_SZ, ENC_MAX_RECORD_SZ, it[2]);
		goto out;
	}
	if (offset < *end) {
		fail(PyExc_ValueError, where,
		     "offset %lld is before the end of the previous field (%u): "
		     "fields must be in order and must not overlap",
		     offset, *end);
		goto out;
	}
	if (get_int(it[3], 1, ENC_MAX_RECORD_SZ, &size, &range)) {
		fail(range ? PyExc_ValueError : PyExc_TypeError, where,
		     "size must be a positive int, not %R", it[3]);
		goto out;
	}
	if (kinds[k].size && size != kinds[k].size) {
		fail(PyExc_ValueError, where, "a %s is %u bytes, not %lld", kind,
		     kinds[k].size, size);
		goto out;
	}
	if (offset + size > ENC_MAX_RECORD_SZ) {
		fail(PyExc_ValueError, where,
		     "the field ends at %lld, past the largest record (%u)",
		     offset + size, ENC_MAX_RECORD_SZ);
		goto out;
	}
	f->offset = (uint32_t)offset;
	f->size = (uint32_t)size;
	*end = (uint32_t)(offset + size);
	if (f->kind == ENC_HEX) {
		encoding = PyUnicode_Check(it[4]) ? PyUnicode_AsUTF8(it[4]) : NULL;
		if (encoding && !strcmp(encoding, "base64")) {
			f->kind = ENC_BASE64;
		} else if (!encoding || strcmp(encoding, "hex")) {
			PyErr_Clear();
			fail(PyExc_ValueError, where,
			     "a bytes field needs encoding 'hex' or 'base64', "
			     "not %R",
			     it[4]);
			goto out;
		}
	} else if (it[4] != Py_None) {
		fail(PyExc_ValueError, where,
		     "only bytes fields take an encoding, this one is %s (give "
		     "None)",
		     kind);
		goto out;
	}
	if (it[5] != Py_None && parse_enum(f, it[5], where, kind))
		goto out;
	f->key = enc_escaped(",\"", (const unsigned char *)name,
			     (size_t)name_len, "\":", &f->key_len);
	if (!f->key) {
		PyErr_NoMemory();
		goto out;
	}
	rc = 0;
out:
	Py_XDECREF(seq);
	return rc;
}

static int parse_schema(struct encoder *e, size_t idx, PyObject *item)
{
	struct enc_schema *s = &e->schemas[idx];
	PyObject *seq, **it, *fseq = NULL, *names = NULL, *where;
	const char *name;
	Py_ssize_t name_len, n, j;
	long long type_id;
	uint32_t end = ENC_HEADER_SZ;
	int range, rc = -1;

	where = PyUnicode_FromFormat("schemas[%zu]", idx);
	if (!where)
		return -1;
	seq = PySequence_Fast(item, "");
	if (!seq || PySequence_Fast_GET_SIZE(seq) != 3) {
		PyErr_Clear();
		fail(PyExc_TypeError, where,
		     "a schema must be a (type_id, name, fields) tuple, not %R",
		     item);
		goto out;
	}
	it = PySequence_Fast_ITEMS(seq);
	if (get_int(it[0], 1, 0xffff, &type_id, &range)) {
		fail(range ? PyExc_ValueError : PyExc_TypeError, where,
		     "type id must be an int from 1 to 65535 (0 is for records "
		     "delivered raw), not %R",
		     it[0]);
		goto out;
	}
	if (e->by_type[type_id]) {
		fail(PyExc_ValueError, where,
		     "duplicate type id %lld (also schemas[%u])", type_id,
		     e->by_type[type_id] - 1U);
		goto out;
	}
	s->type_id = (uint16_t)type_id;
	name = get_name(it[1], where, "the schema name", &name_len);
	if (!name)
		goto out;
	if (name_len == 3 && !memcmp(name, "raw", 3)) {
		fail(PyExc_ValueError, where,
		     "the name 'raw' is reserved for records delivered raw");
		goto out;
	}
	s->name = enc_escaped("", (const unsigned char *)name,
			      (size_t)name_len, "", &s->name_len);
	s->head = enc_escaped(",\"type\":\"", (const unsigned char *)name,
			      (size_t)name_len, "\"", &s->head_len);
	if (!s->name || !s->head) {
		PyErr_NoMemory();
		goto out;
	}
	/* escaping is one-to-one, so equal escaped names are equal names */
	for (size_t i = 0; i < idx; i++)
		if (e->schemas[i].name_len == s->name_len &&
		    !memcmp(e->schemas[i].name, s->name, s->name_len)) {
			fail(PyExc_ValueError, where,
			     "duplicate schema name %R (also schemas[%zu])",
			     it[1], i);
			goto out;
		}
	fseq = PySequence_Fast(it[2], "");
	if (!fseq) {
		PyErr_Clear();
		fail(PyExc_TypeError, where, "fields must be a list, not %R",
		     it[2]);
		goto out;
	}
	n = PySequence_Fast_GET_SIZE(fseq);
	s->fields = calloc(n ? (size_t)n : 1, sizeof(*s->fields));
	names = PySet_New(NULL);
	if (!s->fields || !names) {
		if (!names)
			goto out;
		PyErr_NoMemory();
		goto out;
	}
	for (j = 0; j < n; j++) {
		PyObject *fwhere = PyUnicode_FromFormat(
			"schemas[%zu].fields[%zd]", idx, j);
		int bad;

		if (!fwhere)
			goto out;
		s->n_fields++; /* counted before filling: freed if it fails */
		bad = parse_field(&s->fields[j], PySequence_Fast_GET_ITEM(fseq, j),
				  fwhere, names, &end);
		Py_DECREF(fwhere);
		if (bad)
			goto out;
	}
	s->size = end;
	enc_finish_schema(s);
	e->by_type[type_id] = (uint16_t)(idx + 1);
	rc = 0;
out:
	Py_XDECREF(names);
	Py_XDECREF(fseq);
	Py_XDECREF(seq);
	Py_DECREF(where);
	return rc;
}

static PyObject *Encoder_new(PyTypeObject *type, PyObject *args,
			     PyObject *kwds)
{
	static char *kwlist[] = {"schemas", NULL};
	EncoderObject *self;
	PyObject *arg, *seq;
	Py_ssize_t n;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Encoder", kwlist, &arg))
		return NULL;
	seq = PySequence_Fast(arg, "Encoder() needs a list of (type_id, name, "
				   "fields) schemas");
	if (!seq)
		return NULL;
	n = PySequence_Fast_GET_SIZE(seq);
	if (n > 0xffff) {
		PyErr_SetString(PyExc_ValueError,
				"Encoder(): more schemas than there are type ids");
		goto fail_seq;
	}
	self = (EncoderObject *)type->tp_alloc(type, 0);
	if (!self)
		goto fail_seq;
	if (enc_init(&self->enc, (size_t)n)) {
		PyErr_NoMemory();
		goto fail;
	}
	for (Py_ssize_t i = 0; i < n; i++)
		if (parse_schema(&self->enc, (size_t)i,
				 PySequence_Fast_GET_ITEM(seq, i)))
			goto fail;
	Py_DECREF(seq);
	return (PyObject *)self;
fail:
	Py_DECREF(self);
fail_seq:
	Py_DECREF(seq);
	return NULL;
}

static void Encoder_dealloc(EncoderObject *self)
{
	enc_free(&self->enc);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* --- encoding --------------------------------------------------------------- */

static int enter(EncoderObject *self)
{
	if (self->busy) {
		PyErr_SetString(PyExc_RuntimeError,
				"Encoder used again while one of its calls is "
				"running");
		return -1;
	}
	self->busy = 1;
	return 0;
}

static void leave(EncoderObject *self)
{
	enc_trim(&self->enc);
	self->busy = 0;
}

static uint64_t realtime_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int get_u64(PyObject *o, const char *what, uint64_t *out)
{
	unsigned long long v;

	if (!PyLong_Check(o)) {
		PyErr_Format(PyExc_TypeError, "%s must be an int, not %.200s",
			     what, Py_TYPE(o)->tp_name);
		return -1;
	}
	v = PyLong_AsUnsignedLongLong(o);
	if (v == (unsigned long long)-1 && PyErr_Occurred()) {
		PyErr_Format(PyExc_ValueError,
			     "%s must be an int from 0 to 2**64 - 1, not %R", what,
			     o);
		return -1;
	}
	*out = v;
	return 0;
}

/* The four lists consume() and encode_many() return, one entry per record */
struct out_lists {
	PyObject *lines, *positions, *ts_ns, *types;
};

static int out_new(struct out_lists *o)
{
	o->lines = PyList_New(0);
	o->positions = PyList_New(0);
	o->ts_ns = PyList_New(0);
	o->types = PyList_New(0);
	return o->lines && o->positions && o->ts_ns && o->types ? 0 : -1;
}

static void out_clear(struct out_lists *o)
{
	Py_CLEAR(o->lines);
	Py_CLEAR(o->positions);
	Py_CLEAR(o->ts_ns);
	Py_CLEAR(o->types);
}

static PyObject *out_tuple(struct out_lists *o)
{
	PyObject *t = PyTuple_Pack(4, o->lines, o->positions, o->ts_ns,
				   o->types);

	out_clear(o);
	return t;
}

static int append_new(PyObject *list, PyObject *item)
{
	int rc;

	if (!item)
		return -1;
	rc = PyList_Append(list, item);
	Py_DECREF(item);
	return rc;
}

/* Encode one record and append it to o: 0, or -1 with an exception set */
static int emit(EncoderObject *self, struct out_lists *o, uint64_t pos,
		const void *data, size_t len, uint64_t now_ns)
{
	struct enc_meta meta;
	ssize_t n = enc_record(&self->enc, pos, data, len, now_ns, &meta);

	if (n < 0) {
		PyErr_NoMemory();
		return -1;
	}
	if (append_new(o->lines, PyBytes_FromStringAndSize(self->enc.buf, n)) ||
	    append_new(o->positions, PyLong_FromUnsignedLongLong(pos)) ||
	    append_new(o->ts_ns, PyLong_FromUnsignedLongLong(meta.ts_ns)) ||
	    append_new(o->types, PyLong_FromLong(meta.type_id)))
		return -1;
	return 0;
}

static PyObject *Encoder_encode(EncoderObject *self, PyObject *const *args,
				Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"pos", "data", "now_ns", NULL};
	struct enc_meta meta;
	PyObject *a[3], *res = NULL;
	uint64_t pos, now;
	Py_buffer view;
	ssize_t n;

	if (fast_args("encode", args, nargs, kwnames, names, 3, a) ||
	    get_u64(a[0], "pos", &pos) || get_u64(a[2], "now_ns", &now) ||
	    get_bytes(a[1], &view))
		return NULL;
	if (enter(self)) {
		put_bytes(&view);
		return NULL;
	}
	n = enc_record(&self->enc, pos, view.buf, (size_t)view.len, now, &meta);
	if (n < 0)
		PyErr_NoMemory();
	else
		res = PyBytes_FromStringAndSize(self->enc.buf, n);
	leave(self);
	put_bytes(&view);
	return res;
}

static PyObject *Encoder_encode_many(EncoderObject *self,
				     PyObject *const *args, Py_ssize_t nargs,
				     PyObject *kwnames)
{
	static const char *const names[] = {"records", "now_ns", NULL};
	struct out_lists o = {NULL, NULL, NULL, NULL};
	PyObject *a[2], *seq;
	Py_ssize_t n, i;
	uint64_t now;

	if (fast_args("encode_many", args, nargs, kwnames, names, 2, a) ||
	    get_u64(a[1], "now_ns", &now))
		return NULL;
	seq = PySequence_Fast(a[0], "encode_many() needs a list of "
				    "(position, bytes) pairs");
	if (!seq)
		return NULL;
	if (enter(self)) {
		Py_DECREF(seq);
		return NULL;
	}
	if (out_new(&o))
		goto fail;
	n = PySequence_Fast_GET_SIZE(seq);
	for (i = 0; i < n; i++) {
		PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
		Py_buffer view;
		uint64_t pos;
		int bad;

		if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
			PyErr_Format(PyExc_TypeError,
				     "encode_many(): records[%zd] must be a "
				     "(position, bytes) tuple, not %.200s",
				     i, Py_TYPE(item)->tp_name);
			goto fail;
		}
		if (get_u64(PyTuple_GET_ITEM(item, 0), "a record's position",
			    &pos) ||
		    get_bytes(PyTuple_GET_ITEM(item, 1), &view))
			goto fail;
		bad = emit(self, &o, pos, view.buf, (size_t)view.len, now);
		put_bytes(&view);
		if (bad)
			goto fail;
	}
	leave(self);
	Py_DECREF(seq);
	return out_tuple(&o);
fail:
	leave(self);
	out_clear(&o);
	Py_DECREF(seq);
	return NULL;
}

/* --- from a ring -------------------------------------------------------------- */

struct drain_ctx {
	EncoderObject *self;
	struct out_lists *out;
	uint64_t now_ns;
	int failed;
};

static int drain_one(void *ctx, uint64_t pos, const void *data, uint32_t size)
{
	struct drain_ctx *c = ctx;

	if (emit(c->self, c->out, pos, data, size, c->now_ns)) {
		c->failed = 1;
		return 1;
	}
	return 0;
}

/* as pyring.c's check_consumer(), for a ring passed in */
static int check_ring(PyObject *obj, RingObject **out)
{
	RingObject *ring;

	if (!PyObject_TypeCheck(obj, &RingType)) {
		PyErr_Format(PyExc_TypeError,
			     "Encoder.consume() needs a ringcore.Ring, not "
			     "%.200s",
			     Py_TYPE(obj)->tp_name);
		return -1;
	}
	ring = (RingObject *)obj;
	ring_sync_fork(ring);
	if (!ring->ring.base) {
		PyErr_SetString(RingClosedError, "the ring is closed");
		return -1;
	}
	if (ring->consuming) {
		/* the outer drain holds its own copy of consumer_pos */
		PyErr_SetString(RingError,
				"Encoder.consume() called from inside a "
				"consume_each() callback");
		return -1;
	}
	if (!ring->is_consumer) {
		PyErr_SetString(NotConsumerError,
				"Encoder.consume() needs the consumer: this "
				"handle is a producer (the ring was created in "
				"another process)");
		return -1;
	}
	*out = ring;
	return 0;
}

static PyObject *Encoder_consume(EncoderObject *self, PyObject *const *args,
				 Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"ring", "max_records", NULL};
	struct out_lists o = {NULL, NULL, NULL, NULL};
	struct drain_ctx c = {self, &o, 0, 0};
	RingObject *ring;
	PyObject *a[2];
	uint64_t max;
	int64_t n;

	if (fast_args("consume", args, nargs, kwnames, names, 1, a) ||
	    parse_max(a[1], &max) || check_ring(a[0], &ring))
		return NULL;
	if (enter(self))
		return NULL;
	if (out_new(&o))
		goto fail;
	/* raw records are stamped with the time the drain began */
	c.now_ns = realtime_ns();
	ring->consuming = 1;
	n = rc_consume(&ring->ring, drain_one, &c, max);
	ring->consuming = 0;
	if (c.failed)
		goto fail;
	if (n == -2) {
		PyErr_NoMemory();
		goto fail;
	}
	/* As consume_list(): the records before a corrupt header are handed
	 * out, and consumer_pos stays at the corrupt one, so the next call
	 * reports it. */
	if (n == -1 && PyList_GET_SIZE(o.lines) == 0) {
		raise_corrupt(&ring->ring);
		goto fail;
	}
	leave(self);
	return out_tuple(&o);
fail:
	leave(self);
	out_clear(&o);
	return NULL;
}

static PyObject *Encoder_stats(EncoderObject *self, PyObject *Py_UNUSED(ignored))
{
	const struct enc_stats *s = &self->enc.stats;

	return Py_BuildValue("{sKsKsKsKsKsKsKsK}", "encoded",
			     (unsigned long long)s->encoded, "decoded",
			     (unsigned long long)s->decoded, "unframed",
			     (unsigned long long)s->unframed, "unknown_type",
			     (unsigned long long)s->unknown_type, "short",
			     (unsigned long long)s->short_record, "json",
			     (unsigned long long)s->json, "text",
			     (unsigned long long)s->text, "invalid_json",
			     (unsigned long long)s->invalid_json);
}

static PyObject *Encoder_get_type_ids(EncoderObject *self, void *Py_UNUSED(c))
{
	PyObject *list = PyList_New((Py_ssize_t)self->enc.n_schemas);

	for (size_t i = 0; list && i < self->enc.n_schemas; i++) {
		PyObject *v = PyLong_FromLong(self->enc.schemas[i].type_id);

		if (!v) {
			Py_CLEAR(list);
			break;
		}
		PyList_SET_ITEM(list, (Py_ssize_t)i, v);
	}
	return list;
}

static PyObject *Encoder_repr(EncoderObject *self)
{
	return PyUnicode_FromFormat("<%s of %zu schemas>", Py_TYPE(self)->tp_name,
				    self->enc.n_schemas);
}

static PyMethodDef Encoder_methods[] = {
	{"consume", FASTCALL_KW(Encoder_consume), METH_FASTCALL | METH_KEYWORDS,
	 "consume(ring, max_records=None)\n--\n\n"
	 "Drain up to max_records committed records of a consumer Ring, "
	 "encoding each to JSON straight from ring memory. Returns (lines, "
	 "positions, ts_ns, type_ids), one entry per record: type id 0 and "
	 "the time of the call for records delivered raw."},
	{"encode", FASTCALL_KW(Encoder_encode), METH_FASTCALL | METH_KEYWORDS,
	 "encode(pos, data, now_ns)\n--\n\n"
	 "The JSON of one record (no trailing newline); now_ns stamps it if it "
	 "is delivered raw."},
	{"encode_many", FASTCALL_KW(Encoder_encode_many),
	 METH_FASTCALL | METH_KEYWORDS,
	 "encode_many(records, now_ns)\n--\n\n"
	 "As consume(), for a list of (position, bytes) pairs."},
	{"stats", (PyCFunction)Encoder_stats, METH_NOARGS,
	 "stats()\n--\n\n"
	 "Records encoded since creation: encoded (all), decoded (by a "
	 "schema), and delivered raw by reason: unframed, unknown_type, "
	 "short."},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef Encoder_getset[] = {
	{"type_ids", (getter)Encoder_get_type_ids, NULL,
	 "The type ids of the schemas, in the order given.", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EncoderType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "ringcore._ringcore.Encoder",
	.tp_basicsize = sizeof(EncoderObject),
	.tp_dealloc = (destructor)Encoder_dealloc,
	.tp_repr = (reprfunc)Encoder_repr,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Encoder(schemas)\n--\n\n"
		  "Records to JSON by schema. schemas: a list of (type_id, "
		  "name, fields), each field a (name, kind, offset, size, "
		  "encoding, enum) tuple; service.schema.compile_encoder() "
		  "builds it from schema definitions.",
	.tp_methods = Encoder_methods,
	.tp_getset = Encoder_getset,
	.tp_new = Encoder_new,
};

int encoder_add_type(PyObject *m)
{
	if (PyType_Ready(&EncoderType) < 0)
		return -1;
	return PyModule_AddType(m, &EncoderType);
}
