// Integer softmax of one row of `len` scores (docs/integer_only.md, "Softmax"), reading scores and
// the mask from synchronous memories (data one cycle after the address):
//   pass 1 (len + 1 cycles): top = max of the visible scores
//   pass 2 (len + 1 cycles): S = sum of e = exp(q - top) over the visible keys (tqt_exp)
//   pass 3 (Q_W + 4 cycles per key): P = clip(div_round(e << B_P, max(S, 1), R), 0, 2^B_P - 1),
//          e recomputed (no scratch memory); a masked key has e = 0, so P = 0 (a fully masked row
//          too: S = 0)
// e <= S, so the quotient is at most 2^B_P: the divider computes Q_W = B_P + 1 bits.
// RECIPROCAL = 1 is the cheaper variant (kernels.normalize_reciprocal, RK = B_P + 8): one division per
// row, t = bitlength(S) - RK, r = R(2^(2 RK) / (S 2^-t)) (0 when S = 0), then per key
// P = clip(R((e 2^-t) r 2^-(2 RK - B_P))): a shift, a multiply and a rounding shift (2 cycles a key).
module tqt_softmax_row #(
    parameter int LEN_W = 8,       // row lengths up to 2^LEN_W - 1
    parameter int SC_W = 22,       // scores: signed
    parameter int X_W = 24,
    parameter int XF_W = 27,
    parameter int Z_IN_W = 26,
    parameter int Z_W = 9,
    parameter int L_W = 38,
    parameter int S_W = 47,        // S: unsigned
    parameter int B_P = 8,         // the probability site's bits
    parameter int ROUNDING = 2,
    parameter int SHIFT_W = 8,
    parameter int MAX_LEFT = 0,
    parameter longint Q_LN2 = 64'd181704,
    parameter longint Q_B = 64'd354684,
    parameter longint Q_C = 64'd66012017480,
    parameter longint MAGIC = 0,
    parameter int MAGIC_S = 0,
    parameter bit RECIPROCAL = 0
) (
    input  logic                      clk,
    input  logic                      rst,
    input  logic                      start,
    input  logic [LEN_W-1:0]          len,
    input  logic signed [X_W-1:0]     clamp,
    input  logic signed [SHIFT_W-1:0] shift,
    output logic [LEN_W-1:0]          rd_addr,
    input  logic signed [SC_W-1:0]    rd_score,
    input  logic                      rd_visible,
    output logic                      out_valid,
    output logic [LEN_W-1:0]          out_addr,
    output logic [B_P-1:0]            out_p,
    output logic                      done,
    // the steps, for golden vectors: S per row; x, x_F, z, L, e per key (with out_valid)
    output logic [S_W-1:0]            row_sum,
    output logic signed [7:0]         row_t,     // RECIPROCAL: S's shift and its reciprocal
    output logic [B_P+9:0]            row_r,
    output logic signed [X_W-1:0]     out_x,
    output logic signed [XF_W-1:0]    out_x_f,
    output logic [Z_W-1:0]            out_z,
    output logic [L_W-1:0]            out_l,
    output logic [L_W-1:0]            out_e
);
  typedef enum logic [2:0] {IDLE, TOP, SUM, RECIPROCAL_START, RECIPROCAL_WAIT, FETCH, DIVIDE, EMIT} state_t;
  state_t state;
  logic [LEN_W:0] count;
  logic signed [SC_W-1:0] top;
  logic any_visible;
  logic [S_W-1:0] total;

  logic signed [X_W-1:0] x, x_visible;
  logic signed [XF_W-1:0] x_f;
  logic [Z_W-1:0] z;
  logic [L_W-1:0] l, e, e_visible;
  assign x = rd_score - top;  // X_W = SC_W + 1: exact
  assign x_visible = rd_visible ? x : '0;
  tqt_exp #(.X_W(X_W), .XF_W(XF_W), .Z_IN_W(Z_IN_W), .Z_W(Z_W), .L_W(L_W), .SHIFT_W(SHIFT_W),
            .MAX_LEFT(MAX_LEFT), .Q_LN2(Q_LN2), .Q_B(Q_B), .Q_C(Q_C), .MAGIC(MAGIC), .MAGIC_S(MAGIC_S))
      exp_unit (.x(x_visible), .clamp(clamp), .shift(shift), .x_f(x_f), .z(z), .l(l), .e(e));
  assign e_visible = rd_visible ? e : '0;

  // the divider: each key's (e << B_P) / max(S, 1), or (RECIPROCAL) once per row 2^(2 RK) / S_n
  localparam int RK = B_P + 8;  // kernels.RECIPROCAL_GUARD
  localparam int DIV_NUM_W = RECIPROCAL ? 2 * RK + 2 : L_W + B_P + 1;
  localparam int DIV_DEN_W = RECIPROCAL ? RK : S_W;
  localparam int DIV_Q_W = RECIPROCAL ? RK + 2 : B_P + 1;  // r <= 2^(RK+1) since S_n >= 2^(RK-1)
  localparam logic signed [DIV_NUM_W-1:0] RECIPROCAL_NUMERATOR = 1 <<< (2 * RK);
  logic signed [7:0] t, t_next;  // the reciprocal variant's (below)
  logic [RK-1:0] s_scaled;
  logic [RK+1:0] r, quotient_r;
  logic [B_P-1:0] p_reciprocal;
  logic div_start, div_done;
  /* verilator lint_off UNUSEDSIGNAL */
  logic signed [DIV_Q_W+1:0] quotient;  // where it is r (>= 0) its sign bits are unused
  /* verilator lint_on UNUSEDSIGNAL */
  logic [DIV_DEN_W-1:0] divisor;
  logic signed [DIV_NUM_W-1:0] numerator;
  assign numerator = RECIPROCAL ? RECIPROCAL_NUMERATOR : {1'b0, e_visible, {B_P{1'b0}}};
  assign divisor = RECIPROCAL ? s_scaled : total == 0 ? DIV_DEN_W'(1) : DIV_DEN_W'(total);
  tqt_div_round #(.NUM_W(DIV_NUM_W), .DEN_W(DIV_DEN_W), .Q_W(DIV_Q_W), .ROUNDING(ROUNDING))
      divide (.clk(clk), .rst(rst), .start(div_start), .a(numerator), .b(divisor), .done(div_done),
              .quotient(quotient));

  // the reciprocal variant: t = bitlength(S) - RK, S_n = S 2^-t, e_n = e 2^-t (floor), P from e_n r;
  // the exact unit has none of it
  assign quotient_r = quotient;
  if (RECIPROCAL) begin : reciprocal
    function automatic logic signed [7:0] bit_length(input logic [S_W-1:0] v);
      bit_length = 0;
      for (int j = 0; j < S_W; j++) if (v[j]) bit_length = 8'(j + 1);
    endfunction
    localparam logic signed [7:0] RK_8 = 8'(RK);
    logic [RK-1:0] e_scaled;
    logic [2*RK+2:0] product;
    assign t_next = bit_length(total) - RK_8;
    assign s_scaled = t_next < 0 ? total << (-t_next) : total >> t_next;
    assign e_scaled = t < 0 ? e_visible << (-t) : e_visible >> t;  // e <= S: fits RK bits
    assign product = e_scaled * r;
    tqt_shift_round #(.IN_W(2 * RK + 3), .OUT_W(B_P), .OUT_SIGNED(0), .ROUNDING(ROUNDING), .SHIFT_W(8))
        normalize (.q(product), .shift(8'(2 * RK - B_P)), .out(p_reciprocal));
  end else begin : exact
    assign t_next = '0;
    assign s_scaled = '0;
    assign p_reciprocal = '0;
  end
  assign row_t = t;
  assign row_r = r;

  assign rd_addr = count[LEN_W-1:0];
  assign row_sum = total;

  always_ff @(posedge clk) begin
    done <= 0;
    out_valid <= 0;
    div_start <= 0;
    if (rst) begin
      state <= IDLE;
    end else begin
      case (state)
        IDLE: if (start) begin
          state <= TOP;
          count <= '0;
          any_visible <= 0;
          total <= '0;
        end
        TOP: begin  // address `count` issued now, the data of `count - 1` arrives
          if (count != 0 && rd_visible && (!any_visible || rd_score > top)) begin
            top <= rd_score;
            any_visible <= 1;
          end
          if (count == (LEN_W + 1)'(len)) begin
            state <= SUM;
            count <= '0;
          end else count <= count + 1;
        end
        SUM: begin
          if (count != 0) total <= total + S_W'(e_visible);
          if (count == (LEN_W + 1)'(len)) begin
            state <= RECIPROCAL ? RECIPROCAL_START : FETCH;
            count <= '0;
          end else count <= count + 1;
        end
        RECIPROCAL_START: begin  // S is complete: its shift, and the division 2^(2 RK) / S_n
          t <= t_next;
          div_start <= 1;
          state <= RECIPROCAL_WAIT;
        end
        RECIPROCAL_WAIT: if (div_done) begin
          r <= total == 0 || !RECIPROCAL ? '0 : quotient_r;
          state <= FETCH;
        end
        FETCH: begin
          div_start <= !RECIPROCAL;
          state <= RECIPROCAL ? EMIT : DIVIDE;
        end
        DIVIDE: if (div_done) state <= EMIT;
        EMIT: begin
          out_valid <= 1;
          out_addr <= count[LEN_W-1:0];
          out_p <= RECIPROCAL ? p_reciprocal
                 : quotient >= (B_P + 3)'(1 << B_P) ? {B_P{1'b1}} : quotient[B_P-1:0];
          out_x <= x_visible;
          out_x_f <= rd_visible ? x_f : '0;
          out_z <= rd_visible ? z : '0;
          out_l <= rd_visible ? l : '0;
          out_e <= e_visible;
          if (count == (LEN_W + 1)'(len) - 1) begin
            state <= IDLE;
            done <= 1;
          end else begin
            count <= count + 1;
            state <= FETCH;
          end
        end
        default: state <= IDLE;
      endcase
    end
  end
endmodule
