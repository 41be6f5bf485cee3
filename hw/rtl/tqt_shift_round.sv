// Requantize: clip(shift_round(q, shift, R)) onto an OUT_W-bit grid (docs/integer_only.md,
// "Notation and primitives"). Combinational.
//   shift > 0   R(q 2^-shift): floor      q >>> k
//                              half_up    (q + 2^(k-1)) >>> k
//                              half_even  (q + 2^(k-1) - 1 + ((q >>> k) & 1)) >>> k
//   shift <= 0  q << -shift (exact; the caller bounds -shift by MAX_LEFT)
module tqt_shift_round #(
    parameter int IN_W = 32,       // q: signed
    parameter int OUT_W = 8,
    parameter bit OUT_SIGNED = 1,  // clip range [-2^(OUT_W-1), 2^(OUT_W-1)-1] or [0, 2^OUT_W-1]
    parameter int ROUNDING = 2,    // 0 floor, 1 half_up, 2 half_even
    parameter int SHIFT_W = 8,     // the shift port: signed
    parameter int MAX_LEFT = 0     // the largest left shift the shift port asks for
) (
    input  logic signed [IN_W-1:0]    q,
    input  logic signed [SHIFT_W-1:0] shift,
    output logic [OUT_W-1:0]          out
);
  // MAX_LEFT for a left shift, one bit for the rounding add, one so the clip bounds fit
  localparam int W = (IN_W + MAX_LEFT > OUT_W ? IN_W + MAX_LEFT : OUT_W) + 2;
  localparam logic signed [W-1:0] ONE = 1;
  localparam logic signed [W-1:0] HI = OUT_SIGNED ? (ONE <<< (OUT_W - 1)) - ONE : (ONE <<< OUT_W) - ONE;
  localparam logic signed [W-1:0] LO = OUT_SIGNED ? -(ONE <<< (OUT_W - 1)) : 0;

  logic signed [W-1:0] wide, floor_q, half, rounded;
  logic [SHIFT_W-1:0] magnitude, k;
  logic left;

  assign wide = q;  // sign-extended: q is signed
  assign left = shift[SHIFT_W-1];
  assign magnitude = left ? -shift : shift;
  // a right shift by IN_W or more gives the same result for every rounding (q's sign under floor,
  // else 0): capped there, so that 2^(k-1) fits W bits
  assign k = !left && magnitude > SHIFT_W'(IN_W) ? SHIFT_W'(IN_W) : magnitude;
  assign floor_q = wide >>> k;
  assign half = k == 0 ? '0 : ONE <<< (k - 1);
  assign rounded = left ? wide <<< k
                 : k == 0 || ROUNDING == 0 ? floor_q
                 : ROUNDING == 1 ? (wide + half) >>> k
                 : (wide + half - ONE + (floor_q & ONE)) >>> k;
  assign out = rounded > HI ? HI[OUT_W-1:0] : rounded < LO ? LO[OUT_W-1:0] : rounded[OUT_W-1:0];
endmodule
