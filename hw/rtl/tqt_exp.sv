// exp of a non-positive score difference (docs/integer_only.md, "Softmax"; I-BERT's i-exp on
// power-of-two grids). Combinational:
//   x_c = max(x, clamp)                         clamp = -2^max(6 + h + f, 0), on x's grid f
//   x_F = shift_round(x_c, shift, half_up)      shift = f - F: onto the internal grid F
//   z   = (-x_F) // q_ln2  = ((-x_F) MAGIC) >> MAGIC_S   exact for -x_F < 2^Z_IN_W (hw/params.py
//                                                        proves MAGIC q_ln2 - 2^MAGIC_S <= 2^(MAGIC_S - Z_IN_W))
//   L   = (x_F + z q_ln2 + q_b)^2 + q_c,   e = L >> min(z, 62)
module tqt_exp #(
    parameter int X_W = 24,        // x: signed, <= 0
    parameter int XF_W = 27,       // x_F: signed, <= 0, |x_F| < 2^Z_IN_W
    parameter int Z_IN_W = 26,
    parameter int Z_W = 9,         // z: unsigned
    parameter int L_W = 38,        // L and e: unsigned
    parameter int SHIFT_W = 8,
    parameter int MAX_LEFT = 0,    // the largest left shift onto F (F - f)
    parameter longint Q_LN2 = 64'd181704,
    parameter longint Q_B = 64'd354684,
    parameter longint Q_C = 64'd66012017480,
    parameter longint MAGIC = 0,
    parameter int MAGIC_S = 0
) (
    input  logic signed [X_W-1:0]     x,
    input  logic signed [X_W-1:0]     clamp,
    input  logic signed [SHIFT_W-1:0] shift,
    output logic signed [XF_W-1:0]    x_f,
    output logic [Z_W-1:0]            z,
    output logic [L_W-1:0]            l,
    output logic [L_W-1:0]            e
);
  localparam int MAGIC_W = 64;
  logic signed [X_W-1:0] x_c;
  assign x_c = x < clamp ? clamp : x;
  tqt_shift_round #(.IN_W(X_W), .OUT_W(XF_W), .OUT_SIGNED(1), .ROUNDING(1), .SHIFT_W(SHIFT_W),
                    .MAX_LEFT(MAX_LEFT))
      onto_f (.q(x_c), .shift(shift), .out(x_f));  // never clips: XF_W holds the clamp's image

  logic [Z_IN_W-1:0] magnitude;
  logic [Z_IN_W+MAGIC_W-1:0] scaled;
  assign magnitude = -x_f;
  assign scaled = magnitude * MAGIC;
  assign z = scaled >> MAGIC_S;

  logic signed [Z_W:0] z_signed;
  logic signed [L_W:0] p_b;  // p + q_b = x_F + z q_ln2 + q_b, in (q_b - q_ln2, q_b]: positive
  assign z_signed = z;  // zero-extended; then every operand below is signed (x_F sign-extends)
  assign p_b = x_f + z_signed * Q_LN2 + Q_B;
  assign l = p_b * p_b + Q_C;
  assign e = z > 62 ? '0 : l >> z;
endmodule
